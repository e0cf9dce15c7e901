"""The pipeline file as pydantic models: every key, its compact and long form, its description.

These models describe; they do not run anything and import nothing from the runtime. Checks that need
the file system or the plugin folders (handler references, source files) live in `checks.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

from . import policy
from .expr import check_expression

QUEUE_NAME = r"^[A-Za-z0-9_.:-]{1,200}$"


def _compact(parser: Any) -> Any:
    """A `mode="before"` model validator that expands a compact string with `parser`."""

    def expand(cls: type, data: Any) -> Any:
        return parser(data) if isinstance(data, str) else data

    return model_validator(mode="before")(classmethod(expand))  # type: ignore[arg-type]


def _wrap(parser: Any) -> Any:
    def convert(value: Any) -> Any:
        return parser(value) if isinstance(value, str | int | float) else value

    return BeforeValidator(convert)


Duration = Annotated[float, _wrap(policy.parse_duration), Field(gt=0)]
Rate = Annotated[float, _wrap(policy.parse_rate), Field(gt=0)]
FieldPath = Annotated[str, Field(pattern=policy.FIELD_PATH.pattern)]
Ref = Annotated[str, Field(pattern=policy.REF.pattern, description="module:function")]


def _not_reserved(name: str) -> str:
    if name.startswith("amq."):
        raise ValueError("queue names starting with 'amq.' are reserved by RabbitMQ")
    return name


QueueName = Annotated[str, Field(pattern=QUEUE_NAME), AfterValidator(_not_reserved)]


def _expression(value: Any) -> Any:
    if isinstance(value, str):
        check_expression(value)
    return value


Expression = Annotated[str, BeforeValidator(_expression)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Traces(Model):
    """Where spans go. Compact: `none` | `console` | `otlp` | `file(path)`."""

    exporter: Literal["none", "console", "otlp", "file"] = Field(
        "none", description="none, console, otlp (OTLP/HTTP protobuf) or file (OTLP JSON lines)"
    )
    path: str | None = Field(None, description="file exporter: path, relative to the pipeline file")
    _expand = _compact(policy.parse_traces)

    @model_validator(mode="after")
    def _path_for_file(self) -> Traces:
        if (self.exporter == "file") != (self.path is not None):
            raise ValueError("a path is given with the file exporter, and only with it")
        return self


class Telemetry(Model):
    """OpenTelemetry settings."""

    traces: Traces = Field(default_factory=Traces, description="none | console | otlp | file(path)")
    endpoint: str = Field(
        "http://127.0.0.1:4318",
        description="OTLP/HTTP base URL; spans go to {endpoint}/v1/traces (Jaeger listens on 4318)",
    )
    service_name: str | None = Field(
        None, description="service.name of the spans (default: the pipeline name)"
    )


class Source(Model):
    """Where a producer's events come from. Compact: `file(path)` or `module:function`."""

    file: str | None = Field(None, description=".jsonl or .csv file, relative to the pipeline file")
    function: Ref | None = Field(
        None, description="a generator or async generator of dicts, called with no argument or ctx"
    )
    _expand = _compact(policy.parse_source)

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.file is None) == (self.function is None):
            raise ValueError("expected exactly one of 'file' and 'function'")
        if self.file is not None and not self.file.endswith((".jsonl", ".csv")):
            raise ValueError("expected a .jsonl or .csv file")
        return self


class Route(Model):
    """Contextual queue (pattern 6): choose the queue by a field's value."""

    by: FieldPath = Field(description="the (dotted) field whose value picks the queue")
    to: dict[str, QueueName] = Field(min_length=1, description="value → queue")
    default: QueueName | None = Field(
        None, description="queue for values without a route; without it such a publish fails"
    )


class Producer(Model):
    """A service that reads a source and publishes each event."""

    source: Source = Field(description="file(path) | module:function")
    count: PositiveInt | None = Field(None, description="stop after this many events")
    rate: Rate | None = Field(None, description="pacing, e.g. 500/s or 30/m")
    to: QueueName | None = Field(None, description="the queue every event is published to")
    route: Route | None = Field(None, description="pattern 6: route by a field instead of `to`")
    priority: Expression | None = Field(
        None, description="pattern 3: when(expr) marks events for the priority lane"
    )

    @field_validator("priority", mode="before")
    @classmethod
    def _when(cls, value: Any) -> Any:
        return policy.parse_when(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_target(self) -> Producer:
        if (self.to is None) == (self.route is None):
            raise ValueError("expected exactly one of 'to' and 'route'")
        return self


class Autoscale(Model):
    """Supervisor consumer (pattern 5). Compact: `depth/N max M [min K] [every D] [keep_alive D]`."""

    per: PositiveInt = Field(description="N: one consumer per N events of load")
    max: PositiveInt = Field(description="most consumers")
    min: PositiveInt = Field(1, description="fewest consumers")
    every: Duration = Field(1.0, description="how often the supervisor polls the depth")
    keep_alive: Duration = Field(5.0, description="how long a consumer stays idle before removal")
    _expand = _compact(policy.parse_autoscale)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Ordering(Model):
    """Thread delegate (pattern 2). Compact: `by_context(field)`."""

    by: FieldPath = Field(description="the (dotted) field whose value is the ordering context")
    _expand = _compact(policy.parse_by_context)


class PriorityLane(Model):
    """Ambulance / carpool (pattern 3). Compact: `true` or `when(expr)`."""

    when: Expression | None = Field(
        None, description="CEL expression; without it the producer's mark decides"
    )
    mode: Literal["ambulance", "carpool"] = Field("ambulance", description="who serves the lane")
    carpool: PositiveInt = Field(1, description="carpool: consumers that serve only the lane")

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        return policy.parse_priority_lane(data) if isinstance(data, str | bool) else data


class OnError(Model):
    """What a failed event does. Compact: `retry(N)` | `dead_letter` | `workflow(mod:fn) [attempts N]`."""

    action: Literal["retry", "dead_letter", "workflow"] = Field(
        description="retry, dead_letter or workflow"
    )
    retries: NonNegativeInt = Field(3, description="retry: deliveries after the first, then parked")
    attempts: PositiveInt = Field(
        3, description="workflow: repairs tried before the event is parked"
    )
    repair: Ref | None = Field(None, description="workflow: the repair function module:function")
    backoff: Duration = Field(
        0.1, description="retry: delay before the first retry; doubles each time"
    )
    max_backoff: Duration = Field(5.0, description="retry: longest delay between two deliveries")
    _expand = _compact(policy.parse_on_error)

    @model_validator(mode="after")
    def _options_of_action(self) -> OnError:
        if (self.action == "workflow") != (self.repair is not None):
            raise ValueError("'repair' is given with the workflow action, and only with it")
        if self.action != "retry" and "retries" in self.model_fields_set:
            raise ValueError("'retries' belongs to the retry action")
        if self.action != "workflow" and "attempts" in self.model_fields_set:
            raise ValueError("'attempts' belongs to the workflow action")
        return self


class Dedupe(Model):
    """Idempotent consumer. Compact: `by(field)` (`by(message_id)` for the message id)."""

    by: FieldPath = Field(description="the field that identifies an event, or message_id")
    ttl: Duration = Field(600.0, description="how long a seen id is remembered")
    size: PositiveInt = Field(100_000, description="most ids remembered")
    _expand = _compact(policy.parse_dedupe)


class Consumer(Model):
    """A service that takes events from a queue and calls a handler for each."""

    from_: QueueName = Field(alias="from", description="the queue to consume")
    handler: Ref = Field(description="module:function, def f(event, ctx) or async def")
    emit: QueueName | None = Field(None, description="publish the handler's return values here")
    concurrency: PositiveInt | None = Field(
        None, description="a fixed number of consumers (default 1)"
    )
    autoscale: Autoscale | None = Field(None, description="pattern 5: depth/N max M")
    instances: PositiveInt = Field(1, description="processes running this consumer (amqp)")
    prefetch: PositiveInt | None = Field(None, description="unacknowledged deliveries per consumer")
    ordering: Ordering | None = Field(None, description="pattern 2: by_context(field)")
    priority_lane: PriorityLane | None = Field(None, description="pattern 3: true | when(expr)")
    on_error: OnError = Field(
        default_factory=lambda: OnError(action="retry"),
        description="pattern 7: retry(N) (default retry(3)) | dead_letter | workflow(mod:fn)",
    )
    delivery: Literal["at_least_once", "at_most_once"] = Field(
        "at_least_once", description="pattern 1: ack after the handler (default) or on receipt"
    )
    dedupe: Dedupe | None = Field(
        None, description="pattern 1: by(field) makes the consumer idempotent"
    )
    watch: list[str] = Field(
        default_factory=list, description="pattern 4: config keys in ctx.config"
    )

    @model_validator(mode="after")
    def _scaling(self) -> Consumer:
        if self.concurrency is not None and self.autoscale is not None:
            raise ValueError("expected either 'concurrency' or 'autoscale', not both")
        return self


class FlowControl(Model):
    """Producer control flow (pattern 8). Compact: `upper U [lower L] [delay D] [every T]`."""

    upper: PositiveInt = Field(description="depth above which producers slow down")
    lower: PositiveInt | None = Field(
        None, description="depth at or below which they resume (upper/2)"
    )
    delay: Duration = Field(0.1, description="delay per event while slowed")
    every: Duration = Field(1.0, description="how often the flow monitor polls the depth")
    _expand = _compact(policy.parse_flow_control)

    @model_validator(mode="after")
    def _order(self) -> FlowControl:
        if self.lower is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self

    @property
    def resume_at(self) -> int:
        return self.lower if self.lower is not None else self.upper // 2


class Queue(Model):
    """Settings of one queue; a queue named elsewhere exists without an entry here."""

    flow_control: FlowControl | None = Field(None, description="pattern 8: upper U lower L")


class Spread(Model):
    """How producers spread publishes over `brokers`. Compact: `round_robin` | `by_context(f)`."""

    mode: Literal["round_robin", "by_context"] = Field("round_robin", description="spreading mode")
    by: FieldPath | None = Field(
        None, description="by_context: the field that keeps a context on one broker"
    )
    _expand = _compact(policy.parse_spread)


class Pipeline(Model):
    """An edarun pipeline: producers, queues, consumers and their pattern policies."""

    version: Literal[1] = Field(description="format version; always 1")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="pipeline name")
    broker: str = Field("memory", description="memory | amqp://user:pass@host:5672/vhost")
    brokers: list[str] | None = Field(None, min_length=1, description="pattern 9: several brokers")
    spread: Spread | None = Field(None, description="with brokers: round_robin | by_context(field)")
    plugins: list[str] = Field(default_factory=list, description="folders of handler modules")
    config: dict[str, Any] = Field(default_factory=dict, description="pattern 4: watched values")
    telemetry: Telemetry = Field(default_factory=Telemetry, description="OpenTelemetry settings")
    queues: dict[QueueName, Queue] = Field(default_factory=dict, description="queue settings")
    producers: dict[str, Producer] = Field(default_factory=dict, description="producer services")
    consumers: dict[str, Consumer] = Field(default_factory=dict, description="consumer services")

    @field_validator("queues", mode="before")
    @classmethod
    def _empty_queue_settings(cls, value: Any) -> Any:
        # `queues: {trades: }` (a bare name) is a queue with default settings.
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("broker")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("brokers")
    @classmethod
    def _brokers_scheme(cls, value: list[str] | None) -> list[str] | None:
        return [check_broker_url(url, allow_memory=False) for url in value] if value else value


def check_broker_url(url: str, *, allow_memory: bool = True) -> str:
    if url == "memory" and allow_memory:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("amqp", "amqps") or not rest:
        expected = "'memory' or 'amqp://…'" if allow_memory else "'amqp://…'"
        raise ValueError(f"expected {expected} (scheme {scheme!r} is not a broker)")
    return url
