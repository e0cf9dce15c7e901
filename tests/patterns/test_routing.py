"""Contextual queue: each event lands on its kind's queue; unknown kinds go to default or fail loudly."""

from __future__ import annotations

import pytest

from runner.config.models import Route
from runner.patterns.routing import NoRoute, Router

KINDS = ["book", "music", "movie"]

HANDLERS = """
SEEN = {}


def record(event, ctx):
    SEEN.setdefault(ctx.consumer, []).append(event["id"])


def mixed():
    kinds = ["book", "music", "movie", "game"]
    for i in range(400):
        yield {"id": i, "kind": kinds[i % 4] if i % 10 else kinds[i % 3]}
"""


def routed(factory, mod: str, *, default: bool) -> str:  # type: ignore[no-untyped-def]
    default_line = "default: other" if default else ""
    other_consumer = f'other-c: {{from: other, handler: "{mod}:record"}}' if default else ""
    return factory.pipeline(
        f"""
        version: 1
        name: routed
        plugins: [plugins]
        producers:
          orders:
            source: "{mod}:mixed"
            route:
              by: kind
              to: {{book: books, music: songs, movie: films}}
              {default_line}
        consumers:
          books-c: {{from: books, handler: "{mod}:record"}}
          songs-c: {{from: songs, handler: "{mod}:record"}}
          films-c: {{from: films, handler: "{mod}:record", concurrency: 2}}
          {other_consumer}
        """
    )


def expected() -> dict[str, set[int]]:
    kinds = ["book", "music", "movie", "game"]
    where = {"book": "books-c", "music": "songs-c", "movie": "films-c", "game": "other-c"}
    out: dict[str, set[int]] = {}
    for i in range(400):
        kind = kinds[i % 4] if i % 10 else kinds[i % 3]
        out.setdefault(where[kind], set()).add(i)
    return out


async def test_mixed_events_land_on_their_queues(factory, run_pipeline) -> None:  # type: ignore[no-untyped-def]
    mod = factory.module("routes", HANDLERS)
    code, runner = await run_pipeline(routed(factory, mod, default=True))
    assert code == 0
    seen = factory.imported(mod).SEEN
    assert {name: set(ids) for name, ids in seen.items()} == expected()
    assert runner.stats.producers["orders"].published == 400
    assert runner.stats.producers["orders"].rejected == 0


async def test_without_a_default_unknown_values_fail_loudly(  # type: ignore[no-untyped-def]
    factory, run_pipeline, caplog
) -> None:
    mod = factory.module("noroute", HANDLERS)
    code, runner = await run_pipeline(routed(factory, mod, default=False))
    assert code == 0
    unknown = len(expected()["other-c"])
    stats = runner.stats.producers["orders"]
    assert (stats.published, stats.rejected) == (400 - unknown, unknown)
    assert "no route for kind='game' (routes: book, movie, music; no default)" in caplog.text
    seen = factory.imported(mod).SEEN
    assert "other-c" not in seen and sum(len(v) for v in seen.values()) == 400 - unknown


def test_values_are_compared_as_text() -> None:
    router = Router(Route.model_validate({"by": "order.flag", "to": {"true": "yes", "42": "answer"}}))
    assert router.target({"order": {"flag": True}}) == "yes"
    assert router.target({"order": {"flag": 42}}) == "answer"
    assert router.target({"order": {"flag": 42.0}}) == "answer"
    with pytest.raises(NoRoute, match=r"order\.flag=None"):
        router.target({"order": {}})


def test_yaml_keys_are_text_as_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from runner.config.loader import load_pipeline

    (tmp_path / "e.jsonl").write_text('{"flag": true}\n')
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nname: r\nproducers:\n  p:\n    source: file(e.jsonl)\n"
        "    route: {by: flag, to: {true: yes-queue, 42: answers}}\n"
    )
    route = load_pipeline(path).model.producers["p"].route
    assert route is not None and set(route.to) == {"true", "42"}
    assert Router(route).target({"flag": True}) == "yes-queue"
