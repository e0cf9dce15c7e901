"""The compact policy syntax (SPEC §2): each compact string gives the same model as its long form,
and each malformed one is refused with a message saying what was expected."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from runner.config import policy
from runner.config.expr import KNOWN_FUNCTIONS, evaluate
from runner.config.models import (
    Autoscale,
    Consumer,
    Dedupe,
    FlowControl,
    Metrics,
    OnError,
    Ordering,
    Pipeline,
    PriorityLane,
    Producer,
    Source,
    Spread,
    Telemetry,
    Traces,
)

AUTOSCALE_DEFAULTS = {"min": 1, "every": 1.0, "keep_alive": 5.0}

EQUAL: list[tuple[type[BaseModel], Any, Any]] = [
    # supervisor consumer (pattern 5)
    (Autoscale, "depth/5 max 500", {"per": 5, "max": 500}),
    (Autoscale, "depth/5 max 500", {"per": 5, "max": 500, **AUTOSCALE_DEFAULTS}),
    (Autoscale, "depth / 5   max 500", {"per": 5, "max": 500}),
    (Autoscale, "depth/5 max 500 min 2", {"per": 5, "max": 500, "min": 2}),
    (Autoscale, "depth/5 max 500 every 250ms", {"per": 5, "max": 500, "every": 0.25}),
    (Autoscale, "depth/5 max 500 every 1s", {"per": 5, "max": 500, "every": "1s"}),
    (Autoscale, "depth/5 max 500 every 1.5s", {"per": 5, "max": 500, "every": "1500ms"}),
    (Autoscale, "depth/5 max 500 keep_alive 2m", {"per": 5, "max": 500, "keep_alive": 120}),
    (
        Autoscale,
        "depth/10 max 50 min 3 every 250ms keep_alive 1.5s",
        {"per": 10, "max": 50, "min": 3, "every": "250ms", "keep_alive": 1.5},
    ),
    (
        Autoscale,
        "depth/10 keep_alive 2m every 1s min 3 max 50",
        {"per": 10, "max": 50, "min": 3, "every": 1, "keep_alive": "2m"},
    ),
    # thread delegate (pattern 2)
    (Ordering, "by_context(account)", {"by": "account"}),
    (Ordering, "by_context(order.account)", {"by": "order.account"}),
    (Ordering, " by_context( order.account ) ", {"by": "order.account"}),
    # ambulance / carpool (pattern 3)
    (PriorityLane, True, {}),
    (PriorityLane, True, {"mode": "ambulance"}),
    (PriorityLane, 'when(kind == "CANCEL")', {"when": 'kind == "CANCEL"'}),
    (
        PriorityLane,
        'when(order.account.startsWith("A-"))',
        {"when": 'order.account.startsWith("A-")', "mode": "ambulance"},
    ),
    # workflow event (pattern 7)
    (OnError, "retry(3)", {"action": "retry"}),
    (OnError, "retry(3)", {"action": "retry", "retries": 3}),
    (OnError, "retry(0)", {"action": "retry", "retries": 0}),
    (OnError, "dead_letter", {"action": "dead_letter"}),
    (
        OnError,
        "workflow(trading:repair_trade)",
        {"action": "workflow", "repair": "trading:repair_trade"},
    ),
    (
        OnError,
        "workflow(trading:repair_trade) attempts 3",
        {"action": "workflow", "repair": "trading:repair_trade", "attempts": 3},
    ),
    (
        OnError,
        "workflow(pkg.repairs:fix) attempts 5",
        {"action": "workflow", "repair": "pkg.repairs:fix", "attempts": 5},
    ),
    # producer control flow (pattern 8)
    (FlowControl, "upper 1000 lower 500", {"upper": 1000, "lower": 500}),
    (
        FlowControl,
        "upper 1000 lower 500 delay 20ms every 100ms",
        {"upper": 1000, "lower": 500, "delay": 0.02, "every": 0.1},
    ),
    (
        FlowControl,
        "upper 1000 lower 500 delay 20ms every 100ms",
        {"upper": 1000, "lower": 500, "delay": "20ms", "every": "100ms"},
    ),
    (FlowControl, "upper 1000", {"upper": 1000}),
    (FlowControl, "upper 1000", {"upper": 1000, "delay": 0.1, "every": 1.0}),
    (FlowControl, "upper 10 lower 0", {"upper": 10, "lower": 0}),
    # sources
    (Source, "file(x.jsonl)", {"file": "x.jsonl"}),
    (Source, "file(data/trades.csv)", {"file": "data/trades.csv"}),
    (Source, "trading:feed", {"function": "trading:feed"}),
    (Source, "feeds.market:ticks", {"function": "feeds.market:ticks"}),
    # event forwarding (pattern 1)
    (Dedupe, "by(id)", {"by": "id"}),
    (Dedupe, "by(order.id)", {"by": "order.id", "ttl": 600, "size": 100_000}),
    (Dedupe, "by(message_id) ttl 2m size 50", {"by": "message_id", "ttl": 120, "size": 50}),
    # multi-broker (pattern 9)
    (Spread, "round_robin", {"mode": "round_robin"}),
    (Spread, "round_robin", {}),
    (Spread, "by_context(account)", {"mode": "by_context", "by": "account"}),
    (Spread, "by_context(order.account)", {"mode": "by_context", "by": "order.account"}),
    # telemetry
    (Traces, "none", {"exporter": "none"}),
    (Traces, "none", {}),
    (Traces, "console", {"exporter": "console"}),
    (Traces, "otlp", {"exporter": "otlp"}),
    (Traces, "file(traces.jsonl)", {"exporter": "file", "path": "traces.jsonl"}),
    (Metrics, "none", {}),
    (Metrics, "otlp", {"exporter": "otlp", "every": "5s"}),
    (Metrics, "prometheus", {"exporter": "prometheus", "host": "127.0.0.1", "port": 9464}),
    (Metrics, "prometheus(9100)", {"exporter": "prometheus", "port": 9100}),
    (Metrics, "prometheus(0.0.0.0:9100)", {"exporter": "prometheus", "host": "0.0.0.0", "port": 9100}),
    (Metrics, "prometheus([::1]:9100)", {"exporter": "prometheus", "host": "::1", "port": 9100}),
    (Telemetry, {"metrics": "prometheus"}, {"metrics": {"exporter": "prometheus"}}),
    (Telemetry, {"traces": "otlp"}, {"traces": {"exporter": "otlp"}}),
    (
        Telemetry,
        {"traces": "file(out/t.jsonl)"},
        {"traces": {"exporter": "file", "path": "out/t.jsonl"}},
    ),
]


def _id(case: tuple[type[BaseModel], Any, Any]) -> str:
    model, compact, long = case
    return f"{model.__name__}:{compact!r}={long!r}"


@pytest.mark.parametrize(("model", "compact", "long"), EQUAL, ids=[_id(c) for c in EQUAL])
def test_compact_and_long_form_give_equal_models(model: type[BaseModel], compact: Any, long: Any) -> None:
    short = model.model_validate(compact)
    assert short == model.model_validate(long)
    # the long form a model dumps is itself a valid long form of the same model
    assert model.model_validate(short.model_dump(by_alias=True)) == short


def test_compact_values_are_what_they_say() -> None:
    scale = Autoscale.model_validate("depth/10 max 50 min 3 every 250ms keep_alive 2m")
    assert (scale.per, scale.max, scale.min, scale.every, scale.keep_alive) == (
        10,
        50,
        3,
        0.25,
        120.0,
    )
    assert Autoscale.model_validate("depth/5 max 500 every 1.5s").every == 1.5
    flow = FlowControl.model_validate("upper 1000 lower 500 delay 20ms every 100ms")
    assert (flow.upper, flow.lower, flow.delay, flow.every) == (1000, 500, 0.02, 0.1)
    assert OnError.model_validate("retry(0)").retries == 0
    assert OnError.model_validate("workflow(a:b) attempts 7").attempts == 7
    assert PriorityLane.model_validate(True).when is None
    assert PriorityLane.model_validate(True).mode == "ambulance"


@pytest.mark.parametrize(
    ("text", "resume_at"),
    [("upper 1000", 500), ("upper 1001", 500), ("upper 1000 lower 200", 200), ("upper 1", 0)],
)
def test_flow_control_lower_defaults_to_half_of_upper(text: str, resume_at: int) -> None:
    assert FlowControl.model_validate(text).resume_at == resume_at


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (3, 3.0)],
)
def test_durations(text: Any, seconds: float) -> None:
    assert policy.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("500/s", 500.0), ("30/m", 0.5), ("60/h", 1 / 60), ("0.5/s", 0.5), (500, 500.0)],
)
def test_rates(text: Any, per_second: float) -> None:
    assert policy.parse_rate(text) == pytest.approx(per_second)


PRODUCER = {"source": "file(x.jsonl)", "to": "trades"}


@pytest.mark.parametrize(
    ("compact", "long"),
    [("500/s", 500), ("30/m", 0.5), ("30/m", "0.5/s"), ("120/h", "2/m"), (2, 2.0)],
)
def test_producer_rate_forms(compact: Any, long: Any) -> None:
    assert Producer.model_validate({**PRODUCER, "rate": compact}) == Producer.model_validate(
        {**PRODUCER, "rate": long}
    )


def test_producer_priority_when() -> None:
    compact = Producer.model_validate({**PRODUCER, "priority": "when(shares > 1000)"})
    long = Producer.model_validate({**PRODUCER, "priority": {"when": "shares > 1000"}})
    assert compact == long
    assert compact.priority == "shares > 1000"


def test_a_consumer_written_compactly_equals_its_long_form() -> None:
    compact = {
        "from": "trades",
        "handler": "trading:place_trade",
        "autoscale": "depth/5 max 500",
        "ordering": "by_context(order.account)",
        "priority_lane": 'when(kind == "CANCEL")',
        "on_error": "workflow(trading:repair_trade) attempts 3",
        "dedupe": "by(id)",
    }
    long = {
        "from": "trades",
        "handler": "trading:place_trade",
        "autoscale": {"per": 5, "max": 500, "min": 1, "every": "1s", "keep_alive": "5s"},
        "ordering": {"by": "order.account"},
        "priority_lane": {"when": 'kind == "CANCEL"', "mode": "ambulance"},
        "on_error": {"action": "workflow", "repair": "trading:repair_trade", "attempts": 3},
        "dedupe": {"by": "id"},
    }
    assert Consumer.model_validate(compact) == Consumer.model_validate(long)


def test_consumer_defaults() -> None:
    consumer = Consumer.model_validate({"from": "q", "handler": "m:f"})
    assert consumer.on_error == OnError.model_validate("retry(3)")
    assert consumer.delivery == "at_least_once"
    assert consumer.priority_lane is None
    no_lane = Consumer.model_validate({"from": "q", "handler": "m:f", "priority_lane": False})
    assert no_lane == consumer


def test_pipeline_spread_and_telemetry_compact_forms() -> None:
    base = {"version": 1, "name": "p", "brokers": ["amqp://a", "amqp://b"]}
    compact = Pipeline.model_validate(
        {**base, "spread": "by_context(account)", "telemetry": {"traces": "file(t.jsonl)"}}
    )
    long = Pipeline.model_validate(
        {
            **base,
            "spread": {"mode": "by_context", "by": "account"},
            "telemetry": {"traces": {"exporter": "file", "path": "t.jsonl"}},
        }
    )
    assert compact == long


# (model, value, what the message must say)
MALFORMED: list[tuple[type[BaseModel], Any, str]] = [
    (Autoscale, "depth/x max 5", "expected 'depth/N max M"),
    (Autoscale, "depth/x", "expected 'depth/N max M"),
    (Autoscale, "depth/5", "'max M' is required"),
    (Autoscale, "depth5 max 5", "expected 'depth/N max M"),
    (Autoscale, "queue/5 max 5", "expected 'depth/N max M"),
    (Autoscale, "depth/5 max", "expected 'depth/N max M"),
    (Autoscale, "depth/5 max 5 max 6", "expected 'depth/N max M"),
    (Autoscale, "depth/5 max 5 size 3", "expected 'depth/N max M"),
    (Autoscale, "depth/5 max 5 every soon", "expected a duration like '250ms'"),
    (Autoscale, "depth/5 max 5 every 10", "expected a duration like '250ms'"),
    (Autoscale, "depth/0 max 5", "greater than 0"),
    (Autoscale, "depth/-2 max 5", "greater than 0"),
    (Autoscale, "depth/5 max 0", "greater than 0"),
    (Autoscale, "depth/5 max 5 min 0", "greater than 0"),
    (Autoscale, "depth/5 max 5 min 6", "min (6) is above max (5)"),
    (Autoscale, "depth/5 max 5 every 0s", "greater than 0"),
    (Autoscale, {"per": 5}, "max"),
    (Autoscale, 5, "expected 'depth/N max M"),
    (Ordering, "by_context()", "expected 'by_context(field)'"),
    (Ordering, "by_context(a b)", "expected 'by_context(field)'"),
    (Ordering, "by_context(1a)", "expected 'by_context(field)'"),
    (Ordering, "by_context(a..b)", "expected 'by_context(field)'"),
    (Ordering, "by_contxt(a)", "expected 'by_context(field)'"),
    (Ordering, "account", "expected 'by_context(field)'"),
    (PriorityLane, "maybe", "expected 'when(expression)'"),
    (PriorityLane, "when()", "expected 'when(expression)'"),
    (PriorityLane, "when(kind ==)", "invalid CEL expression"),
    (PriorityLane, "when(shout(kind))", "unknown function shout"),
    (PriorityLane, {"mode": "taxi"}, "'ambulance' or 'carpool'"),
    (PriorityLane, {"carpool": 2}, "'carpool' belongs to mode carpool"),
    (OnError, "retry", "expected 'retry(N)', 'dead_letter' or 'workflow"),
    (OnError, "retry(x)", "valid integer"),
    (OnError, "retry(-1)", "greater than or equal to 0"),
    (OnError, "dead_letter now", "expected 'retry(N)'"),
    (OnError, "explode", "expected 'retry(N)'"),
    (OnError, "workflow()", "the repair function is module:function"),
    (OnError, "workflow(repairs)", "the repair function is module:function"),
    (OnError, "workflow(a:b) attempts", "expected 'retry(N)'"),
    (OnError, "workflow(a:b) tries 3", "expected 'retry(N)'"),
    (OnError, "workflow(a:b) attempts 0", "greater than 0"),
    (OnError, {"action": "retry", "repair": "a:b"}, "only with it"),
    (OnError, {"action": "dead_letter", "retries": 2}, "'retries' belongs to the retry action"),
    (OnError, {"action": "retry", "attempts": 2}, "'attempts' belongs to the workflow action"),
    (FlowControl, "upper", "expected 'upper U [lower L] [delay D] [every T]'"),
    (FlowControl, "lower 5", "'upper U' is required"),
    (FlowControl, "upper 10 sideways 3", "expected 'upper U"),
    (FlowControl, "upper x", "valid integer"),
    (FlowControl, "upper 0", "greater than 0"),
    (FlowControl, "upper 10 lower 20", "lower (20) is above upper (10)"),
    (FlowControl, "upper 10 lower -1", "greater than or equal to 0"),
    (FlowControl, "upper 10 delay 5", "expected a duration"),
    (FlowControl, "upper 10 every -1s", "expected a duration"),
    (Source, "http://example.com/feed", "expected 'file(path.jsonl|path.csv)' or 'module:function'"),
    (Source, "file()", "expected 'file(path)' with a path"),
    (Source, "file(trades.txt)", "expected a .jsonl or .csv file"),
    (Source, "trading", "expected 'file(path.jsonl|path.csv)' or 'module:function'"),
    (Source, {"file": "a.jsonl", "function": "a:b"}, "exactly one of 'file' and 'function'"),
    (Source, {}, "exactly one of 'file' and 'function'"),
    (Dedupe, "by()", "expected 'by(field)"),
    (Dedupe, "id", "expected 'by(field)"),
    (Dedupe, "by(id) ttl", "expected 'by(field)"),
    (Dedupe, "by(id) ttl forever", "expected a duration"),
    (Spread, "random", "expected 'round_robin' or 'by_context(field)'"),
    (Spread, "by_context()", "expected 'round_robin' or 'by_context(field)'"),
    (Spread, {"mode": "by_context"}, "'by' is given with mode by_context"),
    (Spread, {"mode": "round_robin", "by": "x"}, "'by' is given with mode by_context"),
    (Traces, "jaeger", "expected 'none', 'console', 'otlp' or 'file(path)'"),
    (Traces, "file()", "expected 'none', 'console', 'otlp' or 'file(path)'"),
    (Traces, {"exporter": "file"}, "a path is given with the file exporter"),
    (Traces, {"exporter": "none", "path": "x"}, "a path is given with the file exporter"),
    (Metrics, "statsd", "expected 'none', 'otlp', 'prometheus', 'prometheus(PORT)'"),
    (Metrics, "prometheus(x)", "PORT is a number"),
    (Metrics, "prometheus(0)", "greater than or equal to 1"),
    (Metrics, "prometheus(65536)", "less than or equal to 65535"),
    (Metrics, {"exporter": "otlp", "host": "0.0.0.0"}, "'host' belongs to the prometheus exporter"),
    (Metrics, {"exporter": "prometheus", "every": "1s"}, "'every' belongs to the otlp exporter"),
    (Metrics, {"exporter": "otlp", "every": "0s"}, "greater than 0"),
    (Producer, {**PRODUCER, "rate": "fast"}, "expected a rate like '500/s' or '30/m'"),
    (Producer, {**PRODUCER, "rate": "500/d"}, "expected a rate like '500/s'"),
    (Producer, {**PRODUCER, "rate": "0/s"}, "greater than 0"),
    (Producer, {**PRODUCER, "rate": "-5/s"}, "expected a rate"),
    (Producer, {**PRODUCER, "rate": True}, "expected a rate"),
    (Producer, {**PRODUCER, "priority": "shares > 1000"}, "expected 'when(expression)'"),
    (Producer, {**PRODUCER, "priority": "when()"}, "expected 'when(expression)'"),
    (Producer, {**PRODUCER, "priority": "when(a ||)"}, "invalid CEL expression"),
    (Producer, {**PRODUCER, "priority": {"when": "x", "else": 1}}, "expected 'when(expression)'"),
]


@pytest.mark.parametrize(
    ("model", "value", "expected"),
    MALFORMED,
    ids=[f"{m.__name__}:{v!r}" for m, v, _ in MALFORMED],
)
def test_malformed_compact_strings_say_what_was_expected(
    model: type[BaseModel], value: Any, expected: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (policy.parse_autoscale, "depth/5"),
        (policy.parse_autoscale, "max 5"),
        (policy.parse_by_context, "by_context()"),
        (policy.parse_flow_control, "lower 3"),
        (policy.parse_on_error, "retry"),
        (policy.parse_when, "when()"),
        (policy.parse_priority_lane, "yes"),
        (policy.parse_source, "ftp://x"),
        (policy.parse_dedupe, "by()"),
        (policy.parse_spread, "random"),
        (policy.parse_traces, "zipkin"),
        (policy.parse_metrics, "statsd"),
        (policy.parse_metrics, "prometheus(x)"),
        (policy.parse_metrics, "prometheus(:9464)"),
        (policy.parse_duration, "soon"),
        (policy.parse_duration, True),
        (policy.parse_rate, "lots"),
    ],
)
def test_parsers_raise_a_syntax_error_that_says_expected(parser: Any, text: Any) -> None:
    with pytest.raises(policy.PolicySyntaxError, match=r"^expected "):
        parser(text)


def test_every_known_cel_function_is_defined_by_the_library() -> None:
    """A function the load check accepts must be callable at run time (SPEC §2: CEL checked
    at load), so none evaluates to a silent False for want of an implementation."""
    probes = {
        "size": 'size("ab") == 2',
        "int": 'int("1") == 1',
        "uint": "uint(1) == 1u",
        "double": "double(1) == 1.0",
        "string": 'string(1) == "1"',
        "bytes": 'bytes("a") == b"a"',
        "type": "type(1) == int",
        "dyn": "dyn(1) == 1",
        "duration": 'duration("2s") > duration("1s")',
        "timestamp": 'timestamp("2024-01-01T00:00:00Z") < timestamp("2025-01-01T00:00:00Z")',
        "matches": '"abc".matches("^a")',
        "contains": '"abc".contains("b")',
        "startsWith": '"abc".startsWith("a")',
        "endsWith": '"abc".endsWith("c")',
        "getFullYear": 'timestamp("2024-01-01T00:00:00Z").getFullYear() == 2024',
        "getMonth": 'timestamp("2024-02-01T00:00:00Z").getMonth() == 1',
        "getDayOfMonth": 'timestamp("2024-01-03T00:00:00Z").getDayOfMonth() == 2',
        "getDayOfWeek": 'timestamp("2024-01-01T00:00:00Z").getDayOfWeek() == 1',
        "getDayOfYear": 'timestamp("2024-01-02T00:00:00Z").getDayOfYear() == 1',
        "getHours": 'timestamp("2024-01-01T03:00:00Z").getHours() == 3',
        "getMinutes": 'timestamp("2024-01-01T03:04:00Z").getMinutes() == 4',
        "getSeconds": 'timestamp("2024-01-01T03:04:05Z").getSeconds() == 5',
        "getMilliseconds": 'timestamp("2024-01-01T03:04:05.006Z").getMilliseconds() == 6',
        "exists": "[1, 2].exists(i, i > 1)",
        "all": "[1, 2].all(i, i > 0)",
        "exists_one": "[1, 2].exists_one(i, i > 1)",
        "map": "[1, 2].map(i, i * 2) == [2, 4]",
        "filter": "[1, 2].filter(i, i > 1) == [2]",
    }
    functions = {f for f in KNOWN_FUNCTIONS if not f.startswith(("_", "@", "-", "!"))}
    assert functions == set(probes)
    for name, source in probes.items():
        assert evaluate(source, {}), name


def test_expressions_see_the_event_fields() -> None:
    event = {"kind": "CANCEL", "shares": 1500, "order": {"account": "A-7"}}
    assert evaluate('kind == "CANCEL"', event)
    assert evaluate("shares > 1000", event)
    assert evaluate('order.account.startsWith("A-")', event)
    assert not evaluate("missing > 1", event)  # a missing field is False, not an error
