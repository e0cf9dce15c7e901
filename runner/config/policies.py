"""The pattern policies: models that a compact string may stand for (`autoscale: depth/5 max 500`).

Each compact string is parsed by `policy` into exactly the mapping a user could have written, so both
forms go through the same validation and give equal models.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    GetJsonSchemaHandler,
    NonNegativeInt,
    PositiveInt,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from . import policy
from .fields import Duration, Expression, FieldPath, Model, Ref


def _compact(parser: Any) -> Any:
    """A `mode="before"` model validator that expands a compact string with `parser`."""

    def expand(cls: type, data: Any) -> Any:
        if isinstance(data, str):
            return parser(data)
        if isinstance(data, int | float | list):  # neither form: say both
            raise policy.PolicySyntaxError(f"expected {getattr(cls, 'form', '')} or a mapping")
        return data

    return model_validator(mode="before")(classmethod(expand))  # type: ignore[arg-type]


def _changed(model: BaseModel, name: str) -> bool:
    """Whether the file gave `name` a value other than its default. A default written out is
    fine: a dumped model (every field present) must validate again to the same model."""
    return name in model.model_fields_set and (getattr(model, name) != type(model).model_fields[name].default)


class Policy(Model):
    """A model that a compact scalar may stand for. Its JSON Schema offers both forms, so an editor
    using `edarun schema` accepts `autoscale: depth/5 max 500` as well as the mapping."""

    form: ClassVar[str] = ""  # the compact syntax, as errors and the schema show it
    examples: ClassVar[list[Any]] = []

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        long_form = handler.resolve_ref_schema(handler(core_schema))
        kinds = sorted({"boolean" if isinstance(e, bool) else "string" for e in cls.examples})
        compact = {
            "type": kinds[0] if len(kinds) == 1 else kinds,
            "description": f"compact form: {cls.form}",
            "examples": cls.examples,
        }
        return {"description": long_form.get("description", ""), "anyOf": [compact, long_form]}


class Traces(Policy):
    """Where spans go. Compact: `none` | `console` | `otlp` | `file(path)`."""

    form = "'none' | 'console' | 'otlp' | 'file(path)'"
    examples = ["none", "console", "otlp", "file(traces.jsonl)"]

    exporter: Literal["none", "console", "otlp", "file"] = Field(
        default="none", description="none, console, otlp (OTLP/HTTP protobuf) or file (OTLP JSON lines)"
    )
    path: str | None = Field(default=None, description="file exporter: path, relative to the pipeline file")
    _expand = _compact(policy.parse_traces)

    @model_validator(mode="after")
    def _path_for_file(self) -> Traces:
        if (self.exporter == "file") != (self.path is not None):
            raise ValueError("a path is given with the file exporter, and only with it")
        return self


class Metrics(Policy):
    """Where metrics go. Compact: `none` | `otlp` | `prometheus` | `prometheus([HOST:]PORT)`."""

    form = "'none' | 'otlp' | 'prometheus' | 'prometheus(PORT)' | 'prometheus(HOST:PORT)'"
    examples = ["none", "otlp", "prometheus", "prometheus(9464)", "prometheus(0.0.0.0:9464)"]

    exporter: Literal["none", "otlp", "prometheus"] = Field(
        default="none",
        description="none, otlp (OTLP/HTTP protobuf to {endpoint}/v1/metrics) or prometheus (an HTTP "
        "endpoint /metrics to scrape)",
    )
    host: str = Field(
        default="127.0.0.1", min_length=1, description="prometheus: the address the endpoint listens on"
    )
    port: int = Field(default=9464, ge=1, le=65535, description="prometheus: the port of the endpoint")
    every: Duration = Field(default=5.0, description="otlp: how often metrics are exported")
    _expand = _compact(policy.parse_metrics)

    @model_validator(mode="after")
    def _options_of_exporter(self) -> Metrics:
        for name in ("host", "port"):
            if self.exporter != "prometheus" and _changed(self, name):
                raise ValueError(f"'{name}' belongs to the prometheus exporter")
        if self.exporter != "otlp" and _changed(self, "every"):
            raise ValueError("'every' belongs to the otlp exporter")
        return self


class Source(Policy):
    """Where a producer's events come from. Compact: `file(path)` or `module:function`."""

    form = "'file(path.jsonl|path.csv)' | 'module:function'"
    examples = ["file(data/events.jsonl)", "module:function"]

    file: str | None = Field(default=None, description=".jsonl or .csv file, relative to the pipeline file")
    function: Ref | None = Field(
        default=None, description="a generator or async generator of dicts, called with no argument or ctx"
    )
    _expand = _compact(policy.parse_source)

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.file is None) == (self.function is None):
            raise ValueError("expected exactly one of 'file' and 'function'")
        if self.file is not None and not self.file.endswith((".jsonl", ".csv")):
            raise ValueError("expected a .jsonl or .csv file")
        return self


class Autoscale(Policy):
    """Supervisor consumer (pattern 5).

    Compact: `depth/N max M [min K] [every D] [keep_alive D]`.
    """

    form = "'depth/N max M [min K] [every D] [keep_alive D]'"
    examples = ["depth/5 max 500", "depth/5 max 50 min 2 every 250ms keep_alive 5s"]

    per: PositiveInt = Field(description="N: one consumer per N events of load")
    max: PositiveInt = Field(description="most consumers")
    min: PositiveInt = Field(default=1, description="fewest consumers")
    every: Duration = Field(default=1.0, description="how often the supervisor polls the depth")
    keep_alive: Duration = Field(default=5.0, description="how long a consumer stays idle before removal")
    _expand = _compact(policy.parse_autoscale)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Ordering(Policy):
    """Thread delegate (pattern 2). Compact: `by_context(field)`."""

    form = "'by_context(field)'"
    examples = ["by_context(account)", "by_context(order.account)"]

    by: FieldPath = Field(description="the (dotted) field whose value is the ordering context")
    _expand = _compact(policy.parse_by_context)


class PriorityLane(Policy):
    """Ambulance / carpool (pattern 3). Compact: `true` or `when(expr)`."""

    form = "true | 'when(expression)'"
    examples = [True, "when(kind == 'CANCEL')"]

    when: Expression | None = Field(
        default=None, description="CEL expression; without it the producer's mark decides"
    )
    mode: Literal["ambulance", "carpool"] = Field(default="ambulance", description="who serves the lane")
    carpool: PositiveInt = Field(default=1, description="carpool: consumers that serve only the lane")

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if isinstance(data, str | bool | int | float | list):
            return policy.parse_priority_lane(data)
        return data

    @model_validator(mode="after")
    def _carpool_of_mode(self) -> PriorityLane:
        if self.mode != "carpool" and _changed(self, "carpool"):
            raise ValueError("'carpool' belongs to mode carpool")
        return self


class OnError(Policy):
    """What a failed event does (pattern 7).

    Compact: `retry(N)` | `dead_letter` | `workflow(module:function) [attempts N]`.
    """

    form = "'retry(N)' | 'dead_letter' | 'workflow(module:function) [attempts N]'"
    examples = ["retry(3)", "dead_letter", "workflow(module:repair) attempts 3"]

    action: Literal["retry", "dead_letter", "workflow"] = Field(description="retry, dead_letter or workflow")
    retries: NonNegativeInt = Field(default=3, description="retry: deliveries after the first, then parked")
    attempts: PositiveInt = Field(default=3, description="workflow: repairs tried before the event is parked")
    repair: Ref | None = Field(default=None, description="workflow: the repair function module:function")
    backoff: Duration = Field(
        default=0.1, description="retry: delay before the first retry; doubles each time"
    )
    max_backoff: Duration = Field(default=5.0, description="retry: longest delay between two deliveries")
    _expand = _compact(policy.parse_on_error)

    @model_validator(mode="after")
    def _options_of_action(self) -> OnError:
        if (self.action == "workflow") != (self.repair is not None):
            raise ValueError("'repair' is given with the workflow action, and only with it")
        if self.action != "retry" and _changed(self, "retries"):
            raise ValueError("'retries' belongs to the retry action")
        if self.action != "workflow" and _changed(self, "attempts"):
            raise ValueError("'attempts' belongs to the workflow action")
        return self


class Dedupe(Policy):
    """Idempotent consumer. Compact: `by(field)` (`by(message_id)` for the message id)."""

    form = "'by(field) [ttl D] [size N]'"
    examples = ["by(id)", "by(message_id)"]

    by: FieldPath = Field(description="the field that identifies an event, or message_id")
    ttl: Duration = Field(default=600.0, description="how long a seen id is remembered")
    size: PositiveInt = Field(default=100_000, description="most ids remembered")
    _expand = _compact(policy.parse_dedupe)


class FlowControl(Policy):
    """Producer control flow (pattern 8). Compact: `upper U [lower L] [delay D] [every T]`."""

    form = "'upper U [lower L] [delay D] [every T]'"
    examples = ["upper 1000 lower 500", "upper 1000 lower 500 delay 20ms every 100ms"]

    upper: PositiveInt = Field(description="depth above which producers slow down")
    lower: NonNegativeInt | None = Field(
        default=None, description="depth at or below which they resume (default upper/2)"
    )
    delay: Duration = Field(default=0.1, description="delay per event while slowed")
    every: Duration = Field(default=1.0, description="how often the flow monitor polls the depth")
    _expand = _compact(policy.parse_flow_control)

    @model_validator(mode="after")
    def _order(self) -> FlowControl:
        if self.lower is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self

    @property
    def resume_at(self) -> int:
        return self.lower if self.lower is not None else self.upper // 2


class Spread(Policy):
    """How producers spread publishes over `brokers`. Compact: `round_robin` | `by_context(f)`."""

    form = "'round_robin' | 'by_context(field)'"
    examples = ["round_robin", "by_context(account)"]

    mode: Literal["round_robin", "by_context"] = Field(default="round_robin", description="spreading mode")
    by: FieldPath | None = Field(
        default=None, description="by_context: the field that keeps a context on one broker"
    )
    _expand = _compact(policy.parse_spread)

    @model_validator(mode="after")
    def _field_of_mode(self) -> Spread:
        if (self.mode == "by_context") != (self.by is not None):
            raise ValueError("'by' is given with mode by_context, and only with it")
        return self
