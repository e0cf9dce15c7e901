"""Checks of a well-formed pipeline against itself and the world: names, files, plugin references."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import refs
from .yamlpos import Loc

if TYPE_CHECKING:
    from .loader import LoadedPipeline

Problem = tuple[Loc, str]

HANDLER_SHAPE = "(event, ctx)"
REPAIR_SHAPE = "(event, error, ctx)"
SOURCE_SHAPE = "() or (ctx), a generator of dicts"


def check_pipeline(
    loaded: LoadedPipeline, raw: dict[str, Any], *, check_refs: bool
) -> Iterator[Problem]:
    model = loaded.model
    yield from _names(loaded)
    if "broker" in raw and model.brokers:
        yield ("brokers",), "expected either 'broker' or 'brokers', not both"
    if model.spread is not None and not model.brokers:
        yield ("spread",), "'spread' needs 'brokers' (several brokers to spread over)"
    if model.spread is not None and model.spread.mode == "by_context" and model.spread.by is None:
        yield ("spread",), "expected 'by_context(field)' with a field"
    for name, consumer in model.consumers.items():
        for index, key in enumerate(consumer.watch):
            if key not in model.config:
                yield (
                    ("consumers", name, "watch", index),
                    f"{key!r} is not a key of the top-level 'config'",
                )
        if consumer.emit is not None and consumer.emit == consumer.from_:
            yield (
                ("consumers", name, "emit"),
                "emitting to the queue the consumer reads would loop forever",
            )
    for name, producer in model.producers.items():
        if producer.source.file is not None:
            source = loaded.file(producer.source.file)
            if not source.is_file():
                yield (
                    ("producers", name, "source"),
                    f"file {producer.source.file!r} does not exist ({source})",
                )
    for index, folder in enumerate(loaded.plugin_dirs):
        if not folder.is_dir():
            yield ("plugins", index), f"folder {model.plugins[index]!r} does not exist ({folder})"
    if check_refs:
        yield from _references(loaded)


def _names(loaded: LoadedPipeline) -> Iterator[Problem]:
    model = loaded.model
    for name in model.consumers:
        if name in model.producers:
            yield (
                ("consumers", name),
                f"a producer is also named {name!r}; service names must be unique",
            )


def _references(loaded: LoadedPipeline) -> Iterator[Problem]:
    model = loaded.model
    dirs = loaded.plugin_dirs
    wanted: list[tuple[Loc, str, tuple[int, ...], str]] = []
    for name, consumer in model.consumers.items():
        wanted.append((("consumers", name, "handler"), consumer.handler, (2,), HANDLER_SHAPE))
        if consumer.on_error.repair is not None:
            loc = ("consumers", name, "on_error")
            wanted.append((loc, consumer.on_error.repair, (3,), REPAIR_SHAPE))
    for name, producer in model.producers.items():
        if producer.source.function is not None:
            loc = ("producers", name, "source")
            wanted.append((loc, producer.source.function, (0, 1), SOURCE_SHAPE))
    for loc, ref, arity, shape in wanted:
        try:
            refs.check(ref, dirs, arity=arity, shape=shape)
        except refs.RefError as exc:
            yield loc, str(exc)
