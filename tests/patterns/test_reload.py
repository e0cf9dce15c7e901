"""edarun up --reload: edited policies reach running services through the watch path; an invalid
edit or one that cannot apply live changes nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from runner.config.changes import compare
from runner.config.loader import load_pipeline
from runner.patterns.watch import config_queue, state_queue, watch_queue

HANDLERS = """
import time


def feed():
    for i in range(1500):
        yield {"id": i}


def work(event, ctx):
    time.sleep(0.01)
"""

PIPELINE = """
version: 1
name: {name}
plugins: [plugins]
queues:
  {name}-jobs: {{flow_control: upper {upper} lower {lower} delay 5ms every 100ms}}
producers:
  feed: {{source: "{mod}:feed", rate: 300/s, to: {name}-jobs}}
consumers:
  worker:
    from: {name}-jobs
    handler: "{mod}:work"
    autoscale: depth/5 max {most} every 200ms
{extra}"""


async def test_edited_policies_apply_while_running(factory: Any, run_pipeline: Any, broker_url: str) -> None:
    name = f"reload-{os.getpid()}-{os.urandom(3).hex()}"
    mod = factory.module("reload_work", HANDLERS)

    def text(most: Any = 1, upper: int = 100000, lower: int = 50000, extra: str = "") -> str:
        return PIPELINE.format(name=name, mod=mod, most=most, upper=upper, lower=lower, extra=extra)

    path = factory.pipeline(text())
    another = f'  auditor: {{from: {name}-jobs, handler: "{mod}:work"}}\n'

    async def edit() -> None:
        await asyncio.sleep(0.8)
        path.write_text(text(most=0))  # invalid: a maximum of zero
        await asyncio.sleep(0.8)
        path.write_text(text(most=3, extra=another))  # a new consumer cannot start live
        await asyncio.sleep(0.8)
        path.write_text(text(most=2, upper=100, lower=50))  # live; 200/s of work for 300/s: still deep

    editing = asyncio.create_task(edit())
    try:
        code, runner = await run_pipeline(path, reload=True)
    finally:
        editing.cancel()
        if broker_url != "memory":
            from conftest import delete_queues

            services = ["feed", "worker", f"{name}-jobs.flow"]
            await delete_queues(
                [config_queue(name), state_queue(name), *(watch_queue(name, s) for s in services)]
            )
    assert code == 0
    stats = runner.stats
    reloads = stats.reloads
    assert [r["outcome"] for r in reloads] == ["refused", "refused", "applied"], reloads
    invalid, structural, applied = reloads
    # The invalid edit is reported as the loader reports it: file:line:col, key path, expectation.
    assert any(f"{path}:" in line and "autoscale" in line for line in invalid["changes"])
    assert any("consumers.auditor added" in line for line in structural["changes"])
    assert any("restarts: auditor" in line for line in structural["changes"])
    assert any("autoscale.max: 1 → 2" in line for line in applied["changes"])
    assert any("flow_control.upper: 100000 → 100" in line for line in applied["changes"])
    # Before the live edit one consumer ran and nobody slowed the producer; after it, both.
    assert stats.consumers["worker"].max_consumers > 1
    slowed = [f for f in stats.flow if f["state"] == "slow"]
    assert slowed and slowed[0]["at_s"] >= applied["at_s"]
    assert slowed[0]["at_s"] - applied["at_s"] < 2.0  # the acceptance bound of the issue
    # Nothing lost, nothing twice.
    assert stats.producers["feed"].published == 1500
    assert stats.consumers["worker"].processed == 1500


def _models(tmp_path: Path, before: str, after: str) -> Any:
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / "m.py").write_text("def h(event, ctx):\n    pass\n\n\ndef s():\n    yield {}\n")
    base = "version: 1\nname: p\nplugins: [plugins]\n"
    (tmp_path / "a.yaml").write_text(base + before)
    (tmp_path / "b.yaml").write_text(base + after)
    return load_pipeline(tmp_path / "a.yaml").model, load_pipeline(tmp_path / "b.yaml").model


def test_compare_sorts_changes_into_live_and_restart(tmp_path: Path) -> None:
    old, new = _models(
        tmp_path,
        """
config: {limit: 1}
queues: {q: {flow_control: upper 10}}
producers: {p1: {source: "m:s", to: q, rate: 5/s}}
consumers:
  c: {from: q, handler: "m:h", concurrency: 2, on_error: retry(3), priority_lane: "when(x > 1)"}
""",
        """
config: {limit: 2, fresh: true}
queues: {q: {flow_control: upper 20 lower 5}}
producers: {p1: {source: "m:s", to: q, rate: 50/s}}
consumers:
  c: {from: q, handler: "m:h", concurrency: 4, on_error: retry(5), priority_lane: "when(x > 2)"}
""",
    )
    changes = compare(old, new)
    assert not changes.restart
    assert changes.config == {"limit": 2, "fresh": True}
    live = "\n".join(changes.live)
    for part in ("concurrency: 2 → 4", "on_error.retries: 3 → 5", "priority_lane.when", "rate: 5.0 → 50.0"):
        assert part in live, live
    assert "flow_control.upper: 10 → 20" in live


def test_structural_changes_name_what_restarts(tmp_path: Path) -> None:
    old, new = _models(
        tmp_path,
        """
queues: {q: {flow_control: upper 10}}
consumers:
  c: {from: q, handler: "m:h", concurrency: 2}
""",
        """
consumers:
  c: {from: q, handler: "m:h", autoscale: depth/5 max 3, ordering: by_context(k)}
  d: {from: r, handler: "m:h"}
""",
    )
    changes = compare(old, new)
    assert set(changes.services) == {"c", "d"}
    text = "\n".join(changes.restart)
    assert "consumers.d added" in text
    assert "consumers.c.ordering" in text  # an ordering field changes how events are dispatched
    assert "consumers.c.autoscale" in text  # a supervisor that did not run before
    assert "queues.q removed" in text


NUMBERS = """
import threading
import time

RUNNING = []  # handler calls running at once, sampled at each call
_now = [0]
_lock = threading.Lock()
ATTEMPTS = {}


def feed():
    for i in range(400):
        yield {"id": i}


def work(event, ctx):
    with _lock:
        _now[0] += 1
        RUNNING.append((time.monotonic(), _now[0]))
    time.sleep(0.01)
    with _lock:
        _now[0] -= 1
    ATTEMPTS[event["id"]] = ctx.attempt
    if event["id"] % 50 == 7 and ctx.attempt < 3:
        raise RuntimeError("fails twice")
"""


async def test_concurrency_retries_and_rate_apply_live(
    factory: Any, run_pipeline: Any, broker_url: str
) -> None:
    name = f"numbers-{os.getpid()}-{os.urandom(3).hex()}"
    mod = factory.module("reload_numbers", NUMBERS)

    def text(concurrency: int, retries: int, rate: int) -> str:
        return f"""
version: 1
name: {name}
plugins: [plugins]
producers:
  feed: {{source: "{mod}:feed", rate: {rate}/s, to: {name}-work}}
consumers:
  worker: {{from: {name}-work, handler: "{mod}:work", concurrency: {concurrency}, on_error: retry({retries})}}
"""

    path = factory.pipeline(text(1, 0, 100))
    edited_at: list[float] = []

    async def edit() -> None:
        await asyncio.sleep(1.0)
        edited_at.append(asyncio.get_running_loop().time())
        path.write_text(text(4, 3, 400))

    editing = asyncio.create_task(edit())
    try:
        code, runner = await run_pipeline(path, reload=True)
    finally:
        editing.cancel()
        if broker_url != "memory":
            from conftest import delete_queues

            await delete_queues(
                [
                    config_queue(name),
                    state_queue(name),
                    watch_queue(name, "feed"),
                    watch_queue(name, "worker"),
                ]
            )
    assert code == 0
    plugin = factory.imported(mod)
    assert [r["outcome"] for r in runner.stats.reloads] == ["applied"]
    # One at a time before the edit, several at once after it.
    import time as clock

    edit_time = clock.monotonic() - (asyncio.get_running_loop().time() - edited_at[0])
    assert max(n for at, n in plugin.RUNNING if at < edit_time) == 1
    assert max(n for at, n in plugin.RUNNING if at > edit_time) > 1
    # Before the edit a failure was parked at once (retry(0)); after it, retried until it passed.
    stats = runner.stats.consumers["worker"]
    assert stats.parked >= 1 and stats.retried >= 2
    late = [i for i in range(400) if i % 50 == 7 and plugin.ATTEMPTS.get(i) == 3]
    assert late, plugin.ATTEMPTS
    # 400 events at 100/s would take 4 s; at 400/s after the edit the run ends well before.
    assert runner.stats.producers["feed"].published == 400
    assert runner.stats.elapsed < 3.9


LANES = """
import time

LANE = {}  # id -> the lane the event came from


def feed():
    for i in range(300):
        yield {"id": i, "kind": "A" if i % 2 else "B"}


def work(event, ctx):
    LANE[event["id"]] = (ctx.lane, event["kind"], time.monotonic())
    time.sleep(0.001)
"""


async def test_a_lane_expression_applies_live(factory: Any, run_pipeline: Any, broker_url: str) -> None:
    name = f"lanes-{os.getpid()}-{os.urandom(3).hex()}"
    mod = factory.module("reload_lanes", LANES)

    def text(kind: str) -> str:
        return f"""
version: 1
name: {name}
plugins: [plugins]
producers:
  feed: {{source: "{mod}:feed", rate: 150/s, to: {name}-work}}
consumers:
  worker: {{from: {name}-work, handler: "{mod}:work", priority_lane: "when(kind == '{kind}')"}}
"""

    path = factory.pipeline(text("A"))

    async def edit() -> None:
        await asyncio.sleep(0.8)
        path.write_text(text("B"))

    editing = asyncio.create_task(edit())
    try:
        code, runner = await run_pipeline(path, reload=True)
    finally:
        editing.cancel()
        if broker_url != "memory":
            from conftest import delete_queues

            services = ["feed", "worker"]
            await delete_queues(
                [config_queue(name), state_queue(name), *(watch_queue(name, s) for s in services)]
            )
    assert code == 0
    assert [r["outcome"] for r in runner.stats.reloads] == ["applied"]
    lanes = factory.imported(mod).LANE
    assert len(lanes) == 300
    in_order = sorted(lanes.values(), key=lambda item: item[2])
    # The first events take the lane when they are A, the last ones when they are B.
    assert all((lane == "priority") == (kind == "A") for lane, kind, _ in in_order[:40])
    assert all((lane == "priority") == (kind == "B") for lane, kind, _ in in_order[-40:])
