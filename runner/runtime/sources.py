"""Producer sources, pulled lazily: the next event is read only when the producer is ready for it."""

from __future__ import annotations

import csv
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson


class SourceError(ValueError):
    """An event a source yielded that cannot be published (bad JSON line, not a mapping)."""


def _number(text: str) -> Any:
    """CSV values stay strings unless they read as numbers."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


async def jsonl_events(path: Path) -> AsyncIterator[dict[str, Any] | SourceError]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield SourceError(f"{path}:{number}: not JSON: {exc}")
                continue
            if not isinstance(event, dict):
                yield SourceError(f"{path}:{number}: expected a JSON object, got {type(event).__name__}")
                continue
            yield event


async def csv_events(path: Path) -> AsyncIterator[dict[str, Any] | SourceError]:
    with path.open(newline="", encoding="utf-8") as rows:
        for row in csv.DictReader(rows):
            yield {key: _number(value) if isinstance(value, str) else value for key, value in row.items()}


async def function_events(
    function: Callable[..., Any], ctx: Any
) -> AsyncIterator[dict[str, Any] | SourceError]:
    params = inspect.signature(function).parameters
    produced = function(ctx) if params else function()
    if inspect.isasyncgen(produced):
        async for event in produced:
            yield (
                event
                if isinstance(event, dict)
                else SourceError(f"yielded {type(event).__name__}, expected a dict")
            )
    elif inspect.isgenerator(produced) or hasattr(produced, "__iter__"):
        for event in produced:
            yield (
                event
                if isinstance(event, dict)
                else SourceError(f"yielded {type(event).__name__}, expected a dict")
            )
    else:
        raise SourceError(f"{function.__qualname__} returned {type(produced).__name__}, expected a generator")


def open_source(
    file: Path | None, function: Callable[..., Any] | None, ctx: Any
) -> AsyncIterator[dict[str, Any] | SourceError]:
    if file is not None:
        return jsonl_events(file) if file.suffix == ".jsonl" else csv_events(file)
    assert function is not None
    return function_events(function, ctx)
