"""The value types of the pipeline file (durations, rates, field paths, references, queue names,
expressions) and the base of every model: what a single key may hold, checked where it is written."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from . import policy
from .expr import check_expression

QUEUE_NAME = r"^[A-Za-z0-9_.:-]{1,200}$"
PIPELINE_NAME = r"^[A-Za-z0-9_.-]{1,100}$"


def _wrap(parser: Any) -> Any:
    def convert(value: Any) -> Any:
        return parser(value) if isinstance(value, str | int | float) else value

    return BeforeValidator(convert)


def _number_or(pattern: str, example: str) -> WithJsonSchema:
    """The schema of a positive number that may also be written as a string with a unit."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": pattern, "examples": [example]},
            ]
        }
    )


Duration = Annotated[
    float,
    _wrap(policy.parse_duration),
    Field(gt=0),
    _number_or(r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$", "250ms"),
]
Rate = Annotated[
    float,
    _wrap(policy.parse_rate),
    Field(gt=0),
    _number_or(r"^\s*\d+(\.\d+)?\s*/\s*(s|m|h)\s*$", "500/s"),
]
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
    """The base of every model of the file: unknown keys are errors, a loaded model never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
