"""Checks of a pipeline against itself and the world: names, files, plugin references.

They read the raw data one field at a time and check each field that is well-formed on its own, so
a file with errors elsewhere still gets every check: all its errors are reported at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import policy, refs
from .policies import OnError, Ordering, Source, Spread
from .policy import REF
from .yamlpos import Loc

Problem = tuple[Loc, str]
M = TypeVar("M", bound=BaseModel)

HANDLER_SHAPE = "(event, ctx)"
REPAIR_SHAPE = "(event, error, ctx)"
SOURCE_SHAPE = "() or (ctx), a generator of dicts"


def check_pipeline(raw: dict[str, Any], base_dir: Path, *, check_refs: bool) -> Iterator[Problem]:
    """Every problem of `raw` (the file's data) that the models alone cannot see."""
    consumers = _mapping(raw.get("consumers"))
    producers = _mapping(raw.get("producers"))
    if "broker" in raw and raw.get("brokers"):
        yield ("brokers",), "expected either 'broker' or 'brokers', not both"
    if raw.get("spread") is not None and not raw.get("brokers"):
        yield ("spread",), "'spread' needs 'brokers' (several brokers to spread over)"
    yield from _spread(raw, consumers)
    for name in consumers:
        if name in producers:
            yield (
                ("consumers", name),
                f"a producer is also named {name!r}; service names must be unique",
            )
    plugins = raw.get("plugins", [])
    plugins = [plugins] if isinstance(plugins, str) else plugins
    dirs: tuple[Path, ...] | None = None
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        dirs = refs.plugin_folders(base_dir, plugins)
        for index, folder in enumerate(dirs):
            if not folder.is_dir():
                yield ("plugins", index), f"folder {plugins[index]!r} does not exist ({folder})"
    config = raw.get("config", {})
    if isinstance(config, dict):
        for key in config:
            if isinstance(key, str) and key.startswith("edarun."):
                # The config service carries edarun's own values (the live policies) beside them.
                yield ("config", key), "keys starting with 'edarun.' are reserved for edarun"
    for name, consumer in consumers.items():
        yield from _consumer(("consumers", name), consumer, config)
        if check_refs and dirs is not None:
            yield from _consumer_refs(("consumers", name), consumer, dirs)
    for name, producer in producers.items():
        yield from _producer(("producers", name), producer, base_dir, dirs if check_refs else None)
    yield from _lanes(raw, consumers, producers)


def _mapping(value: Any) -> dict[str, dict[str, Any]]:
    """The entries of a `consumers:`/`producers:` section that are mappings themselves."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(v, dict)}


def _valid(model: type[M], value: Any) -> M | None:
    try:
        return model.model_validate(value)
    except ValidationError:
        return None  # reported where the whole file is validated


def _consumer(loc: Loc, consumer: dict[str, Any], config: Any) -> Iterator[Problem]:
    watch = consumer.get("watch")
    if isinstance(watch, list) and isinstance(config, dict):
        for index, key in enumerate(watch):
            if isinstance(key, str) and key not in config:
                yield (*loc, "watch", index), f"{key!r} is not a key of the top-level 'config'"
    emit, source = consumer.get("emit"), consumer.get("from")
    if isinstance(emit, str) and emit == source:
        yield (*loc, "emit"), "emitting to the queue the consumer reads would loop forever"
    instances = consumer.get("instances")
    if consumer.get("ordering") is not None and isinstance(instances, int) and instances > 1:
        # Each process would keep its own allocation map: one context could run in two at once.
        yield (
            (*loc, "instances"),
            (
                "ordering needs one process per consumer (each would order only its own share); "
                "scale inside it with concurrency or autoscale"
            ),
        )


def _spread(raw: dict[str, Any], consumers: dict[str, dict[str, Any]]) -> Iterator[Problem]:
    """Multi-broker (pattern 9): an ordered consumer reads every broker at once, so the order of a
    context holds only if all its events are on one broker, which `spread: by_context` ensures."""
    brokers = raw.get("brokers")
    if not isinstance(brokers, list) or len(brokers) < 2:
        return
    spread = _valid(Spread, raw["spread"]) if raw.get("spread") is not None else Spread()
    if spread is None or spread.mode == "by_context":
        return  # a different field than the ordering's is the user's call: one may imply the other
    for name, consumer in consumers.items():
        ordering = _valid(Ordering, consumer["ordering"]) if consumer.get("ordering") is not None else None
        if ordering is not None:
            yield (
                ("consumers", name, "ordering"),
                f"ordering over several brokers needs 'spread: by_context({ordering.by})' (round_robin "
                "puts the events of one context on different brokers, and their order is lost)",
            )


def _lanes(
    raw: dict[str, Any], consumers: dict[str, dict[str, Any]], producers: dict[str, dict[str, Any]]
) -> Iterator[Problem]:
    """Priority lanes (pattern 3): one lane policy per queue, a lane's name free, marks that land."""
    lanes: dict[str, tuple[str, Any]] = {}  # queue → (first consumer, its priority_lane)
    for name, consumer in consumers.items():
        queue, lane = consumer.get("from"), consumer.get("priority_lane")
        if not isinstance(queue, str):
            continue
        if lane is None or lane is False:
            continue  # it reads the standard queue only, beside those that read the lane too
        if queue in lanes and _lane_when(lanes[queue][1]) != _lane_when(lane):
            first = lanes[queue][0]
            yield (
                ("consumers", name, "priority_lane"),
                f"consumers {first!r} and {name!r} put different events in the priority lane of "
                f"{queue!r}; a queue has one rule for what goes in its lane",
            )
        lanes.setdefault(queue, (name, lane))
    laned = set(lanes)
    named = {*_mapping(raw.get("queues")), *(c.get("from") for c in consumers.values())}
    named |= {c.get("emit") for c in consumers.values()} | {p.get("to") for p in producers.values()}
    for queue in sorted(q for q in named if isinstance(q, str)):
        base = queue.removesuffix(".priority")
        if base != queue and base in laned:
            yield (
                ("consumers", lanes[base][0], "priority_lane"),
                f"{queue!r} is the priority lane of {base!r}; it cannot be named as a queue of its own",
            )
    for name, producer in producers.items():
        if producer.get("priority") is None:
            continue
        route = producer.get("route")
        targets = [producer.get("to")]
        if isinstance(route, dict):
            targets += [*_mapping_values(route.get("to")), route.get("default")]
        if not any(t in laned for t in targets if isinstance(t, str)):
            yield (
                ("producers", name, "priority"),
                "none of this producer's queues has a priority lane (set priority_lane on the "
                "consumer of its queue)",
            )


def _lane_when(lane: Any) -> Any:
    """What decides the lane of an event: None (no lane), True (marks only) or the expression."""
    if lane is None:
        return None
    try:
        data = lane if isinstance(lane, dict) else policy.parse_priority_lane(lane)
    except policy.PolicySyntaxError:
        return lane  # reported where the whole file is validated
    when = data.get("when")
    return when.strip() if isinstance(when, str) else True


def _mapping_values(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else []


def _consumer_refs(loc: Loc, consumer: dict[str, Any], dirs: tuple[Path, ...]) -> Iterator[Problem]:
    handler = consumer.get("handler")
    if isinstance(handler, str) and REF.match(handler):
        yield from _reference((*loc, "handler"), handler, dirs, (2,), HANDLER_SHAPE)
    on_error = _valid(OnError, consumer["on_error"]) if "on_error" in consumer else None
    if on_error is not None and on_error.repair is not None:
        yield from _reference((*loc, "on_error"), on_error.repair, dirs, (3,), REPAIR_SHAPE)


def _producer(
    loc: Loc, producer: dict[str, Any], base_dir: Path, dirs: tuple[Path, ...] | None
) -> Iterator[Problem]:
    source = _valid(Source, producer["source"]) if "source" in producer else None
    if source is None:
        return
    if source.file is not None:
        path = (base_dir / source.file).resolve()
        if not path.is_file():
            yield (*loc, "source"), f"file {source.file!r} does not exist ({path})"
    if source.function is not None and dirs is not None:
        yield from _reference((*loc, "source"), source.function, dirs, (0, 1), SOURCE_SHAPE)


def _reference(
    loc: Loc, ref: str, dirs: tuple[Path, ...], arity: tuple[int, ...], shape: str
) -> Iterator[Problem]:
    try:
        refs.check(ref, dirs, arity=arity, shape=shape)
    except refs.RefError as exc:
        yield loc, str(exc)
