"""`edarun validate` on invalid pipelines (SPEC §4, §7): exit 2, one `file:line:col: key: what` line
per error, pointing at the right place, never a traceback, never a credential."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.config.loader import LoadedPipeline, PipelineError, load_pipeline

UNSET = "EDARUN_TEST_SURELY_UNSET"

PLUGIN = '''\
"""Handlers of the test pipelines."""


def handle(event, ctx):
    return event


async def handle_async(event, ctx):
    return None


def one_arg(event):
    return None


def repair(event, error, ctx):
    return event


def feed():
    yield {"id": 1}


NOT_A_FUNCTION = 3
'''

# Line numbers below refer to this file: 1 version … 11 handler; 12 is the first added line.
BASE = """\
version: 1
name: shop
plugins: [plugins]
producers:
  feed:
    source: file(events.jsonl)
    to: orders
consumers:
  worker:
    from: orders
    handler: shop:handle
"""


def replace(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def consumer_with(*lines: str) -> str:
    return BASE + "".join(f"    {line}\n" for line in lines)


# Each level lists the previous one ten times: 10**8 values from a few lines.
ALIAS_BOMB = BASE + "config:\n  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
for _low, _high in zip("abcdefg", "bcdefgh", strict=True):
    ALIAS_BOMB += f"  {_high}: &{_high} [{', '.join([f'*{_low}'] * 10)}]\n"


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    line: int | None  # None: not checked (the position is not the point of the case)
    column: int | None = None
    says: tuple[str, ...] = ()
    cli: bool = True  # through `python -m runner validate`; else through load_pipeline


CASES = [
    Case(
        "tab-indentation",
        "version: 1\nname: shop\nconsumers:\n\tworker:\n    from: orders\n",
        4,
        1,
        ("tab",),
    ),
    Case(
        "unknown-key",
        consumer_with("prefech: 10"),
        12,
        5,
        ("consumers.worker.prefech", "unknown key 'prefech'", "did you mean 'prefetch'?"),
    ),
    Case(
        "unknown-top-level-key",
        replace("plugins:", "plugin:"),
        3,
        1,
        ("unknown key 'plugin'", "did you mean 'plugins'?"),
        cli=False,
    ),
    Case(
        "duplicate-key",
        consumer_with("handler: shop:repair"),
        12,
        5,
        ("consumers.worker.handler", "duplicate key 'handler'", "first at line 11"),
    ),
    Case(
        "missing-from",
        replace("    from: orders\n", ""),
        9,
        3,
        ("consumers.worker.from", "required key is missing"),
    ),
    Case(
        "missing-handler",
        replace("    handler: shop:handle\n", ""),
        9,
        3,
        ("consumers.worker.handler", "required key is missing"),
    ),
    Case(
        "handler-ref-syntax",
        replace("shop:handle", "shop.handle"),
        11,
        14,
        ("consumers.worker.handler", "expected 'module:function'"),
    ),
    Case(
        "handler-module-not-found",
        replace("shop:handle", "nowhere:handle"),
        11,
        14,
        ("module 'nowhere' not found",),
    ),
    Case(
        "handler-function-not-found",
        replace("shop:handle", "shop:vanished"),
        11,
        14,
        ("module 'shop' has no function 'vanished'",),
    ),
    Case(
        "handler-not-callable",
        replace("shop:handle", "shop:NOT_A_FUNCTION"),
        11,
        14,
        ("is not callable",),
        cli=False,
    ),
    Case(
        "handler-wrong-signature",
        replace("shop:handle", "shop:one_arg"),
        11,
        14,
        ("shop:one_arg must have the signature (event, ctx)",),
    ),
    Case(
        "repair-wrong-signature",
        consumer_with("on_error: workflow(shop:handle) attempts 2"),
        12,
        15,
        ("consumers.worker.on_error", "(event, error, ctx)"),
        cli=False,
    ),
    Case(
        "source-function-not-found",
        replace("file(events.jsonl)", "shop:no_feed"),
        6,
        13,
        ("producers.feed.source", "has no function 'no_feed'"),
        cli=False,
    ),
    Case(
        "autoscale-does-not-parse",
        consumer_with("autoscale: depth/x"),
        12,
        16,
        ("consumers.worker.autoscale", "expected 'depth/N max M"),
    ),
    Case(
        "autoscale-zero-divisor",
        consumer_with("autoscale: depth/0 max 5"),
        12,
        16,
        ("consumers.worker.autoscale.per", "greater than 0"),
    ),
    Case(
        "autoscale-zero-max",
        consumer_with("autoscale: depth/5 max 0"),
        12,
        16,
        ("consumers.worker.autoscale.max", "greater than 0"),
    ),
    Case(
        "autoscale-long-form-zero-max",
        consumer_with("autoscale:", "  per: 5", "  max: 0"),
        14,
        12,
        ("consumers.worker.autoscale.max", "greater than 0"),
        cli=False,
    ),
    Case(
        "zero-count",
        replace("    to: orders\n", "    to: orders\n    count: 0\n"),
        8,
        12,
        ("producers.feed.count", "greater than 0"),
    ),
    Case(
        "negative-prefetch",
        consumer_with("prefetch: -1"),
        12,
        15,
        ("consumers.worker.prefetch", "greater than 0"),
    ),
    Case(
        "retry-does-not-parse",
        consumer_with("on_error: retry(x)"),
        12,
        15,
        ("consumers.worker.on_error", "integer"),
        cli=False,
    ),
    Case(
        "lower-above-upper",
        BASE + "queues:\n  orders:\n    flow_control: upper 100 lower 500\n",
        14,
        19,
        ("queues.orders.flow_control", "lower (500) is above upper (100)"),
    ),
    Case(
        "empty-route-to",
        replace("    to: orders\n", "    route:\n      by: kind\n      to: {}\n"),
        9,
        7,
        ("producers.feed.route.to",),
    ),
    Case(
        "both-to-and-route",
        replace("    to: orders\n", "    to: orders\n    route: {by: kind, to: {a: orders}}\n"),
        5,
        3,
        ("producers.feed", "expected exactly one of 'to' and 'route'"),
    ),
    Case(
        "neither-to-nor-route",
        replace("    to: orders\n", ""),
        5,
        3,
        ("producers.feed", "expected exactly one of 'to' and 'route'"),
    ),
    Case(
        "unknown-broker-scheme",
        replace("name: shop\n", "name: shop\nbroker: redis://x\n"),
        3,
        9,
        ("broker", "expected 'memory' or 'amqp://…'", "'redis'"),
    ),
    Case(
        "unknown-scheme-in-brokers",
        replace("name: shop\n", "name: shop\nbrokers:\n  - amqp://a\n  - kafka://b\n"),
        5,
        5,
        ("brokers[1]", "expected 'amqp://…'"),
        cli=False,
    ),
    Case(
        "memory-broker-without-a-name-in-brokers",
        replace("name: shop\n", "name: shop\nbrokers: [memory://a, memory]\n"),
        3,
        23,
        ("brokers[1]", "expected 'amqp://…' or 'memory://name'"),
        cli=False,
    ),
    Case(
        "memory-and-amqp-brokers-mixed",
        replace("name: shop\n", "name: shop\nbrokers: [memory://a, 'amqp://u:hunter2@b']\n"),
        3,
        10,
        ("brokers", "expected all amqp:// or all memory://name, not a mix"),
    ),
    Case(
        "a-broker-listed-twice",
        replace("name: shop\n", "name: shop\nbrokers:\n  - memory://a\n  - memory://a\n"),
        4,
        3,
        ("brokers", "a broker is listed twice"),
        cli=False,
    ),
    Case(
        "ordering-over-brokers-spread-round-robin",
        replace("name: shop\n", "name: shop\nbrokers: [memory://a, memory://b]\nspread: round_robin\n")
        + "    ordering: by_context(account)\n",
        14,
        15,
        ("consumers.worker.ordering", "needs 'spread: by_context(account)'"),
    ),
    Case("version-2", replace("version: 1", "version: 2"), 1, 10, ("version",)),
    Case(
        "missing-name",
        replace("name: shop\n", ""),
        1,
        1,
        ("name: required key is missing",),
    ),
    Case(
        "source-file-missing",
        replace("file(events.jsonl)", "file(data/missing.jsonl)"),
        6,
        13,
        ("producers.feed.source", "'data/missing.jsonl' does not exist"),
    ),
    Case(
        "plugins-folder-missing",
        replace("plugins: [plugins]", "plugins: [plugins, extras]"),
        3,
        20,
        ("plugins[1]", "folder 'extras' does not exist"),
        cli=False,
    ),
    Case(
        "unset-variable",
        replace("name: shop", f"name: ${{{UNSET}}}"),
        2,
        7,
        ("name", f"environment variable {UNSET} is not set"),
    ),
    Case("empty-file", "", 1, 1, ("empty",)),
    Case("only-comments", "# nothing here\n", 1, 1, ("empty",), cli=False),
    Case("a-list", "- version: 1\n- name: shop\n", 1, 1, ("expected a mapping",)),
    Case("yaml-syntax", "version: 1\nname: [shop\n", 3, 1, ("YAML syntax error",), cli=False),
    Case(
        "cel-syntax",
        consumer_with("priority_lane: when(kind ==)"),
        12,
        20,
        ("consumers.worker.priority_lane.when", "invalid CEL expression 'kind =='"),
    ),
    Case(
        "cel-undefined-function",
        consumer_with("priority_lane: when(shout(kind))"),
        12,
        20,
        ("unknown function shout",),
    ),
    Case(
        "cel-extension-function",
        consumer_with('priority_lane: when(kind.lowerAscii() == "cancel")'),
        12,
        20,
        ("unknown function lowerAscii",),
        cli=False,
    ),
    Case(
        "producer-priority-cel",
        replace("    to: orders\n", "    to: orders\n    priority: when(size() >)\n")
        + "    priority_lane: true\n",
        8,
        15,
        ("producers.feed.priority", "invalid CEL expression"),
        cli=False,
    ),
    Case(
        "producer-priority-without-lane",
        replace("    to: orders\n", "    to: orders\n    priority: when(id > 1)\n"),
        8,
        15,
        ("producers.feed.priority", "none of this producer's queues has a priority lane"),
    ),
    Case(
        "lane-rules-disagree",
        consumer_with("priority_lane: when(id > 1)")
        + "  other:\n    from: orders\n    handler: shop:handle\n    priority_lane: true\n",
        16,
        20,
        ("consumers.other.priority_lane", "put different events in the priority lane of 'orders'"),
    ),
    Case(
        "lane-name-taken",
        consumer_with("priority_lane: true", "emit: orders.priority"),
        12,
        20,
        ("consumers.worker.priority_lane", "'orders.priority' is the priority lane of 'orders'"),
    ),
    Case(
        "watch-key-not-in-config",
        "config:\n  max_order: 10\n" + consumer_with("watch: [max_order, min_order]"),
        14,
        24,
        ("consumers.worker.watch[1]", "'min_order' is not a key of the top-level 'config'"),
    ),
    Case(
        "reserved-config-key",
        BASE + "config:\n  edarun.policy: 1\n",
        13,
        18,
        ("config.edarun.policy", "reserved for edarun"),
        cli=False,
    ),
    Case(
        "concurrency-and-autoscale",
        consumer_with("concurrency: 4", "autoscale: depth/5 max 50"),
        9,
        3,
        ("consumers.worker", "either 'concurrency' or 'autoscale', not both"),
    ),
    Case(
        "emit-to-own-queue",
        consumer_with("emit: orders"),
        12,
        11,
        ("consumers.worker.emit", "loop"),
        cli=False,
    ),
    Case(
        "service-name-twice",
        BASE + "  feed:\n    from: orders\n    handler: shop:handle\n",
        12,
        3,
        ("consumers.feed", "service names must be unique"),
        cli=False,
    ),
    Case(
        "recursive-alias",
        BASE + "config:\n  loop: &loop [*loop]\n",
        13,
        9,
        ("alias",),
        cli=False,
    ),
    Case(
        "alias-bomb",
        ALIAS_BOMB,
        None,
        None,
        ("YAML error",),
        cli=False,
    ),
    Case(
        "python-tag",
        replace("name: shop", "name: !!python/name:os.system"),
        2,
        7,
        ("YAML syntax error",),
        cli=False,
    ),
    Case(
        "type-of-a-policy",
        consumer_with("autoscale: 5"),
        12,
        16,
        ("consumers.worker.autoscale", "expected 'depth/N max M"),
        cli=False,
    ),
    Case(
        "metrics-does-not-parse",
        BASE + "telemetry:\n  metrics: statsd\n",
        13,
        12,
        ("telemetry.metrics", "expected 'none', 'otlp', 'prometheus', 'prometheus(PORT)'"),
    ),
    Case(
        "metrics-port-out-of-range",
        BASE + "telemetry:\n  metrics: prometheus(0.0.0.0:70000)\n",
        13,
        12,
        ("telemetry.metrics.port", "less than or equal to 65535"),
    ),
    Case(
        "metrics-option-of-another-exporter",
        BASE + "telemetry:\n  metrics:\n    exporter: otlp\n    port: 9000\n",
        13,
        3,
        ("telemetry.metrics", "'port' belongs to the prometheus exporter"),
        cli=False,
    ),
]

# name → (text, through the CLI): the CLI redacts URLs it prints, the loader must not print them
CREDENTIAL_CASES = {
    "credential-unknown-scheme": (
        replace("name: shop\n", "name: shop\nbroker: redis://user:hunter2@h\n"),
        True,
    ),
    "credential-without-scheme": (
        replace("name: shop\n", "name: shop\nbroker: user:hunter2@h/vh\n"),
        True,
    ),
    "credential-one-slash": (
        replace("name: shop\n", "name: shop\nbroker: amqp:/user:hunter2@h\n"),
        False,
    ),
    "credential-in-brokers": (
        replace("name: shop\n", "name: shop\nbrokers: [amqps://u:hunter2@a, 'redis://u:hunter2@b']\n"),
        False,
    ),
    "credential-with-other-errors": (
        replace("name: shop\n", "name: shop\nbroker: amqp://user:hunter2@h:5672/vh\nbrokr: hunter2\n"),
        False,
    ),
}

INJECTION_MARK = "pwned"


def _injection(folder: Path) -> str:
    target = folder / INJECTION_MARK
    return consumer_with(f'priority_lane: \'when(__import__("os").system("touch {target}"))\'')


SEVERAL = """\
version: 1
name: shop
plugins: [plugins]
producers:
  feed:
    source: file(missing.jsonl)
    to: orders
    rat: 5/s
consumers:
  worker:
    from: orders
    handler: nowhere:handle
    on_error: workflow(shop:missing_repair)
  other:
    from: orders
    handler: shop:handle
    autoscale: depth/0 max 5
    priority_lane: when(shout(x))
    watch: [nothing]
    handlr: shop:handle
"""
SEVERAL_EXPECTED = [
    (6, "producers.feed.source", "does not exist"),
    (8, "producers.feed.rat", "did you mean 'rate'?"),
    (12, "consumers.worker.handler", "module 'nowhere' not found"),
    (13, "consumers.worker.on_error", "no function 'missing_repair'"),
    (17, "consumers.other.autoscale.per", "greater than 0"),
    (18, "consumers.other.priority_lane.when", "unknown function shout"),
    (19, "consumers.other.watch[0]", "'nothing' is not a key"),
    (20, "consumers.other.handlr", "did you mean 'handler'?"),
]

VALID = """\
version: 1
name: trading
broker: memory
plugins: [plugins]
config:
  max_order: ${EDARUN_TEST_SURELY_UNSET:-1000000}
telemetry:
  traces: file(traces.jsonl)
  endpoint: http://127.0.0.1:4318
queues:
  orders:
    flow_control: upper 1000 lower 500 delay 20ms every 100ms
  confirmations:
producers:
  feed:
    source: file(events.jsonl)
    count: 100
    rate: 500/s
    to: orders
    priority: when(shares > 1000)
  ticks:
    source: shop:feed
    rate: 30/m
    route:
      by: kind
      to: {BUY: orders, SELL: orders}
      default: confirmations
consumers:
  worker:
    from: orders
    handler: shop:handle
    emit: confirmations
    autoscale: depth/5 max 500 min 2 every 250ms keep_alive 2m
    prefetch: 100
    ordering: by_context(order.account)
    priority_lane: when(kind == "CANCEL")
    on_error: workflow(shop:repair) attempts 3
    delivery: at_least_once
    dedupe: by(id)
    watch: [max_order]
  confirm:
    from: confirmations
    handler: shop:handle_async
    concurrency: 4
    priority_lane: true
    on_error: retry(0)
    delivery: at_most_once
  audit:
    from: orders
    handler: shop:handle
    on_error: dead_letter
"""


def _workspace(folder: Path) -> None:
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    (folder / "plugins" / "shop.py").write_text(PLUGIN)
    (folder / "events.jsonl").write_text('{"id": 1, "kind": "BUY", "shares": 10}\n')


Results = dict[str, tuple[Path, subprocess.CompletedProcess[str]]]


def _validate(path: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    env.pop("EDARUN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "runner", "validate", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder of the case files, its plugins and data. The in-process cases import its
    plugins: they leave neither the folder on sys.path nor its modules behind."""
    folder = tmp_path_factory.mktemp("pipelines")
    _workspace(folder)
    saved_path = list(sys.path)
    yield folder
    sys.path[:] = saved_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(folder.resolve())):
            del sys.modules[name]


@pytest.fixture(scope="module")
def results(workspace: Path) -> Results:
    """Every CLI case validated once, in parallel: each is its own `python -m runner` process."""
    texts = {case.id: case.text for case in CASES}
    texts |= {name: text for name, (text, _) in CREDENTIAL_CASES.items()}
    texts |= {"injection": _injection(workspace), "several": SEVERAL, "valid": VALID}
    paths = {name: workspace / f"{name}.yaml" for name in texts}
    for name, text in texts.items():
        paths[name].write_text(text)
    cli = {case.id for case in CASES if case.cli}
    cli |= {name for name, (_, through_cli) in CREDENTIAL_CASES.items() if through_cli}
    cli |= {"injection", "several", "valid"}
    jobs = {name: (str(paths[name]), None) for name in sorted(cli)}
    paths["missing-file"] = workspace / "does-not-exist.yaml"
    jobs["missing-file"] = (str(paths["missing-file"]), None)
    # one case is named as a user in its folder would name it: the output keeps that path
    paths["missing-name"] = Path("missing-name.yaml")
    jobs["missing-name"] = ("missing-name.yaml", workspace)
    with ThreadPoolExecutor(max_workers=max(4, (os.cpu_count() or 2) * 2)) as pool:
        runs = pool.map(lambda job: _validate(*job), jobs.values())
        return {name: (paths[name], run) for name, run in zip(jobs, runs, strict=True)}


def _refused(results: Results, name: str) -> tuple[Path, list[str]]:
    """The error lines of a CLI case, after the checks every refusal must pass."""
    path, run = results[name]
    assert "Traceback" not in run.stdout + run.stderr
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines, "no error printed"
    pattern = re.compile(rf"^{re.escape(str(path))}:\d+:\d+: ")
    for line in lines:
        assert pattern.match(line), line
    return path, lines


def _refused_in_process(workspace: Path, name: str) -> tuple[Path, list[str]]:
    path = workspace / f"{name}.yaml"
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, env={k: v for k, v in os.environ.items() if k != UNSET})
    pattern = re.compile(rf"^{re.escape(str(path))}:\d+:\d+: ")
    for line in caught.value.lines:
        assert pattern.match(line), line
        assert "\n" not in line
    return path, caught.value.lines


def _position(line: str, path: Path) -> tuple[int, int]:
    line_no, column = line.removeprefix(f"{path}:").split(":")[:2]
    return int(line_no), int(column)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_invalid_pipeline_is_refused_at_its_place(results: Results, workspace: Path, case: Case) -> None:
    if case.cli:
        path, lines = _refused(results, case.id)
    else:
        path, lines = _refused_in_process(workspace, case.id)
    if case.line is not None:
        assert len(lines) == 1, lines
        assert _position(lines[0], path) == (case.line, case.column), lines[0]
    for fragment in case.says:
        assert any(fragment in line for line in lines), (fragment, lines)


def test_the_cases_are_distinct() -> None:
    assert len({case.text for case in CASES}) == len(CASES)
    assert len([case for case in CASES if case.cli]) >= 24


@pytest.mark.parametrize("name", sorted(CREDENTIAL_CASES))
def test_credentials_never_appear_in_validate_output(results: Results, workspace: Path, name: str) -> None:
    if CREDENTIAL_CASES[name][1]:
        _refused(results, name)
        _, run = results[name]
        assert "hunter2" not in run.stdout + run.stderr
    else:
        _, lines = _refused_in_process(workspace, name)
        assert "hunter2" not in "\n".join(lines)


def test_a_when_expression_is_never_python(results: Results, workspace: Path) -> None:
    path, lines = _refused(results, "injection")
    assert len(lines) == 1
    assert _position(lines[0], path) == (12, 20)
    assert "invalid CEL expression" in lines[0]
    assert not (workspace / INJECTION_MARK).exists()


def test_several_errors_are_all_reported_sorted_by_line(results: Results) -> None:
    path, lines = _refused(results, "several")
    assert [_position(line, path)[0] for line in lines] == [n for n, _, _ in SEVERAL_EXPECTED]
    for line, (_, key, what) in zip(lines, SEVERAL_EXPECTED, strict=True):
        assert f": {key}: " in line and what in line, line


def test_a_missing_file_names_the_file_alone(results: Results) -> None:
    path, run = results["missing-file"]
    assert run.returncode == 2
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stderr.strip() == f"{path}: no such file"


def test_the_path_is_printed_as_given(results: Results) -> None:
    path, lines = _refused(results, "missing-name")
    assert str(path) == "missing-name.yaml"
    assert lines == ["missing-name.yaml:1:1: name: required key is missing"]


def test_a_pipeline_with_every_policy_is_valid(results: Results) -> None:
    path, run = results["valid"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stdout.startswith(f"{path}: valid (2 producers, 3 consumers)")


def test_a_default_stands_in_for_an_unset_variable(workspace: Path) -> None:
    loaded = load_pipeline(workspace / "valid.yaml", env={})
    assert loaded.model.config == {"max_order": 1000000}  # read as YAML reads the literal
    loaded = load_pipeline(workspace / "valid.yaml", env={UNSET: "7"})
    assert loaded.model.config == {"max_order": 7}


def test_unset_variable_in_process(workspace: Path) -> None:
    path = workspace / "unset-variable.yaml"
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path, env={})
    assert caught.value.lines == [
        f"{path}:2:7: name: environment variable {UNSET} is not set (use ${{{UNSET}:-default}})"
    ]
    assert load_pipeline(path, env={UNSET: "shop"}).model.name == "shop"


# --- resolving handlers -----------------------------------------------------------------------


@pytest.fixture
def clean_imports() -> Iterator[Callable[[str], None]]:
    """Restores sys.path and forgets the named plugin modules after the test."""
    saved_path = list(sys.path)
    names: list[str] = []
    yield names.append
    sys.path[:] = saved_path
    for name in names:
        sys.modules.pop(name, None)


def _pipeline(folder: Path, module: str, marker: str) -> Path:
    (folder / "plugins").mkdir(parents=True)
    (folder / "plugins" / f"{module}.py").write_text(
        f"MARK = {marker!r}\n\n\ndef handle(event, ctx):\n    return {{'by': MARK}}\n"
    )
    path = folder / "pipeline.yaml"
    path.write_text(
        "version: 1\n"
        f"name: {marker}\n"
        "plugins: [plugins]\n"
        "consumers:\n"
        "  worker:\n"
        "    from: orders\n"
        f"    handler: {module}:handle\n"
    )
    return path


def test_load_pipeline_resolves_the_handler(tmp_path: Path, clean_imports: Callable[[str], None]) -> None:
    clean_imports("edarun_test_single")
    loaded = load_pipeline(_pipeline(tmp_path, "edarun_test_single", "one"))
    assert isinstance(loaded, LoadedPipeline)
    assert loaded.plugin_dirs == ((tmp_path / "plugins").resolve(),)
    handler = loaded.resolve(loaded.model.consumers["worker"].handler)
    assert handler({}, None) == {"by": "one"}


def test_same_module_name_in_two_pipelines_resolves_each_its_own(
    tmp_path: Path, clean_imports: Callable[[str], None]
) -> None:
    clean_imports("handlers")
    first = load_pipeline(_pipeline(tmp_path / "first", "handlers", "first"))
    second = load_pipeline(_pipeline(tmp_path / "second", "handlers", "second"))
    # in either order, and again after the other one: each pipeline gets its own module
    for loaded, marker in [(first, "first"), (second, "second"), (first, "first")]:
        handler = loaded.resolve("handlers:handle")
        assert handler({}, None) == {"by": marker}
        assert handler.__module__ == "handlers"
        assert Path(sys.modules["handlers"].__file__).parent == loaded.plugin_dirs[0]


def test_brokers_may_be_named_memory_brokers(tmp_path: Path) -> None:
    """Pattern 9 on the embedded broker: `memory://name` brokers live side by side in one process."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "mbok.py").write_text("def handle(event, ctx):\n    return None\n")
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nname: m\nbrokers: [memory://a, memory://b]\nspread: by_context(account)\n"
        "plugins: [plugins]\nconsumers:\n  c:\n    from: q\n    handler: mbok:handle\n"
        "    ordering: by_context(account)\n"
    )
    model = load_pipeline(path).model
    assert model.broker_urls == ["memory://a", "memory://b"]
    assert model.spread is not None and model.spread.by == "account"
    path.write_text("version: 1\nname: m\nbroker: memory://solo\n")
    assert load_pipeline(path).model.broker_urls == ["memory://solo"]


def test_ordering_with_several_instances_is_refused(tmp_path: Path) -> None:
    from runner.config.loader import PipelineError, load_pipeline

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "ordinst.py").write_text("def handle(event, ctx):\n    return None\n")
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nname: o\nplugins: [plugins]\nconsumers:\n  c:\n    from: q\n"
        "    handler: ordinst:handle\n    ordering: by_context(account)\n    instances: 2\n"
    )
    with pytest.raises(PipelineError) as caught:
        load_pipeline(path)
    assert caught.value.lines == [
        f"{path}:9:16: consumers.c.instances: ordering needs one process per consumer (each would order "
        "only its own share); scale inside it with concurrency or autoscale"
    ]
