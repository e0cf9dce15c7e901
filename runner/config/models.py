"""The pipeline file as pydantic models: every key, its compact and long form, its description.

These models describe; they do not run anything and import nothing from the runtime. The value types
live in `fields.py`, the pattern policies in `policies.py` (both re-exported here); checks that need the
file system or the plugin folders (handler references, source files) live in `checks.py`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveInt, WithJsonSchema, field_validator, model_validator

from . import policy
from .fields import (
    PIPELINE_NAME,
    QUEUE_NAME,
    Duration,
    Expression,
    FieldPath,
    Model,
    QueueName,
    Rate,
    Ref,
)
from .policies import (
    Autoscale,
    Dedupe,
    FlowControl,
    Metrics,
    OnError,
    Ordering,
    Policy,
    PriorityLane,
    Source,
    Spread,
    Traces,
)

__all__ = [
    "PIPELINE_NAME",
    "QUEUE_NAME",
    "Autoscale",
    "Consumer",
    "Dedupe",
    "Duration",
    "Expression",
    "FieldPath",
    "FlowControl",
    "Metrics",
    "Model",
    "OnError",
    "Ordering",
    "Pipeline",
    "Policy",
    "PriorityLane",
    "Producer",
    "Queue",
    "QueueName",
    "Rate",
    "Ref",
    "Route",
    "Source",
    "Spread",
    "Telemetry",
    "Traces",
    "check_broker_url",
    "is_memory",
]


class Telemetry(Model):
    """OpenTelemetry settings."""

    traces: Traces = Field(default_factory=Traces, description="none | console | otlp | file(path)")
    metrics: Metrics = Field(
        default_factory=Metrics,
        description="none | otlp | prometheus | prometheus(PORT) | prometheus(HOST:PORT)",
    )
    endpoint: str = Field(
        default="http://127.0.0.1:4318",
        description="OTLP/HTTP base URL; spans go to {endpoint}/v1/traces, metrics to {endpoint}/v1/metrics "
        "(Jaeger listens on 4318)",
    )
    service_name: str | None = Field(
        default=None, description="service.name of the spans and metrics (default: the pipeline name)"
    )


class Route(Model):
    """Contextual queue (pattern 6): choose the queue by a field's value."""

    by: FieldPath = Field(description="the (dotted) field whose value picks the queue")
    to: dict[str, QueueName] = Field(min_length=1, description="value → queue")
    default: QueueName | None = Field(
        default=None, description="queue for values without a route; without it such a publish fails"
    )


_PRIORITY_SCHEMA = {
    "anyOf": [
        {"type": "string", "examples": ["when(shares > 1000)"]},
        {
            "type": "object",
            "properties": {"when": {"type": "string", "description": "CEL expression"}},
            "required": ["when"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ]
}


class Producer(Model):
    """A service that reads a source and publishes each event."""

    source: Source = Field(description="file(path) | module:function")
    count: PositiveInt | None = Field(default=None, description="stop after this many events")
    rate: Rate | None = Field(default=None, description="pacing, e.g. 500/s or 30/m")
    to: QueueName | None = Field(default=None, description="the queue every event is published to")
    route: Route | None = Field(default=None, description="pattern 6: route by a field instead of `to`")
    priority: Annotated[Expression | None, WithJsonSchema(_PRIORITY_SCHEMA)] = Field(
        default=None, description="pattern 3: when(expr) marks events for the priority lane"
    )

    @field_validator("priority", mode="before")
    @classmethod
    def _when(cls, value: Any) -> Any:
        if isinstance(value, str):
            return policy.parse_when(value)
        if isinstance(value, dict):  # the long form of `when(expr)`
            if set(value) != {"when"}:
                raise ValueError("expected 'when(expression)' or a mapping {when: expression}")
            return value["when"]
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Producer:
        if (self.to is None) == (self.route is None):
            raise ValueError("expected exactly one of 'to' and 'route'")
        return self

    @property
    def targets(self) -> list[str]:
        """Every queue it may publish to, in the order the file names them."""
        if self.route is not None:
            return list(
                dict.fromkeys(
                    [*self.route.to.values(), *([self.route.default] if self.route.default else [])]
                )
            )
        return [self.to] if self.to else []


class Consumer(Model):
    """A service that takes events from a queue and calls a handler for each."""

    from_: QueueName = Field(alias="from", description="the queue to consume")
    handler: Ref = Field(description="module:function, def f(event, ctx) or async def")
    emit: QueueName | None = Field(default=None, description="publish the handler's return values here")
    concurrency: PositiveInt | None = Field(
        default=None, description="a fixed number of consumers (default 1)"
    )
    autoscale: Autoscale | None = Field(default=None, description="pattern 5: depth/N max M")
    instances: PositiveInt = Field(default=1, description="processes running this consumer (amqp)")
    prefetch: PositiveInt | None = Field(default=None, description="unacknowledged deliveries per consumer")
    ordering: Ordering | None = Field(default=None, description="pattern 2: by_context(field)")
    priority_lane: PriorityLane | None = Field(default=None, description="pattern 3: true | when(expr)")
    on_error: OnError = Field(
        default_factory=lambda: OnError(action="retry"),
        description="pattern 7: retry(N) (default retry(3)) | dead_letter | workflow(mod:fn)",
    )
    delivery: Literal["at_least_once", "at_most_once"] = Field(
        default="at_least_once", description="pattern 1: ack after the handler (default) or on receipt"
    )
    dedupe: Dedupe | None = Field(
        default=None, description="pattern 1: by(field) makes the consumer idempotent"
    )
    watch: list[str] = Field(default_factory=list, description="pattern 4: config keys in ctx.config")

    @field_validator("priority_lane", mode="before")
    @classmethod
    def _no_lane(cls, value: Any) -> Any:
        return None if value is False else value  # `priority_lane: false` is no lane

    @model_validator(mode="after")
    def _scaling(self) -> Consumer:
        if self.concurrency is not None and self.autoscale is not None:
            raise ValueError("expected either 'concurrency' or 'autoscale', not both")
        return self


class Queue(Model):
    """Settings of one queue; a queue named elsewhere exists without an entry here."""

    flow_control: FlowControl | None = Field(default=None, description="pattern 8: upper U lower L")
    queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description="RabbitMQ queue type: classic, or quorum (replicated; recommended on a cluster)",
    )


def _member_url(url: str) -> str:
    return check_broker_url(url, plain_memory=False)


# Checked one by one, so an error names the URL's place in the list (brokers[1]).
BrokerUrl = Annotated[str, AfterValidator(_member_url)]


class Pipeline(Model):
    """An edarun pipeline: producers, queues, consumers and their pattern policies."""

    version: Literal[1] = Field(description="format version; always 1")
    name: str = Field(pattern=PIPELINE_NAME, description="pipeline name")
    broker: str = Field(
        default="memory", description="memory | memory://name | amqp://user:pass@host:5672/vhost"
    )
    brokers: list[BrokerUrl] | None = Field(
        default=None,
        min_length=1,
        description="pattern 9: several brokers, all amqp:// or all memory://name (in one process)",
    )
    spread: Spread | None = Field(default=None, description="with brokers: round_robin | by_context(field)")
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

    @field_validator("plugins", mode="before")
    @classmethod
    def _one_folder(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `plugins: plugins`

    @field_validator("broker")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return check_broker_url(value)

    @field_validator("brokers")
    @classmethod
    def _one_kind_each_once(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if len({is_memory(url) for url in value}) > 1:
            # A memory broker lives in one process; RabbitMQ services run in several.
            raise ValueError("expected all amqp:// or all memory://name, not a mix")
        if len(set(value)) < len(value):
            raise ValueError("a broker is listed twice")
        return value

    @property
    def broker_urls(self) -> list[str]:
        """The brokers the pipeline runs on: `brokers`, or the one `broker`."""
        return list(self.brokers) if self.brokers else [self.broker]


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,30}$")
_MEMORY_NAME = re.compile(r"^memory://[A-Za-z0-9_.-]+$")


def is_memory(url: str) -> bool:
    """`memory`, or `memory://name`: an embedded broker of that name, in this process."""
    return url == "memory" or url.startswith("memory://")


def check_broker_url(url: str, *, plain_memory: bool = True) -> str:
    """`url` when it names a broker; the error never repeats the URL, which may hold a password.

    `plain_memory` is for `broker:`; in `brokers:` each memory broker needs a name of its own."""
    if (url == "memory" and plain_memory) or _MEMORY_NAME.match(url):
        return url
    scheme, sep, rest = url.partition("://")
    if scheme == "memory" and sep:
        raise ValueError("expected 'memory://name' (letters, digits, '.', '_', '-')")
    if not sep or scheme not in ("amqp", "amqps") or not rest:
        expected = "'memory' or 'amqp://…'" if plain_memory else "'amqp://…' or 'memory://name'"
        if sep and _SCHEME.match(scheme):
            raise ValueError(f"expected {expected} (scheme {scheme!r} is not a broker)")
        raise ValueError(f"expected {expected}")
    return url
