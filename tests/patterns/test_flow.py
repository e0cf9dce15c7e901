"""Producer control flow: a fast producer is slowed while its queue is deep; nothing is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runner.brokers.memory import MemoryBroker
from runner.config.models import FlowControl
from runner.patterns.flow import NORMAL, SLOW, FlowListener, FlowMonitor

HANDLERS = """
import asyncio
import time

PUBLISHED = []  # time each event was taken from the source (just before its publish)
FINISHED = []


def feed():
    for i in range(3000):
        PUBLISHED.append(time.monotonic())
        yield {"id": i}


async def work(event, ctx):
    await asyncio.sleep(0.002)
    FINISHED.append(time.monotonic())
"""


def max_depth(published: list[float], finished: list[float]) -> int:
    """The deepest the queue got, from publish and finish times alone (not the broker's count)."""
    depth = deepest = 0
    for _, change in sorted([(t, 1) for t in published] + [(t, -1) for t in finished]):
        depth += change
        deepest = max(deepest, depth)
    return deepest


async def test_flow_control_keeps_the_queue_shallow(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("flow_fast", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: flow
        plugins: [plugins]
        queues:
          orders: {{flow_control: upper 200 lower 100 delay 20ms every 100ms}}
        producers:
          feed: {{source: "{mod}:feed", to: orders, rate: 2000/s}}
        consumers:
          worker: {{from: orders, handler: "{mod}:work"}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    plugin = factory.imported(mod)
    assert len(plugin.FINISHED) == 3000  # all processed
    deepest = max_depth(plugin.PUBLISHED, plugin.FINISHED)
    assert deepest < 800, deepest
    flow = runner.stats.report("idle")["flow"]
    states = [change["state"] for change in flow]
    assert states[:2] == ["slow", "resume"] and len(states) >= 4, flow
    assert all(c["queue"] == "orders" and c["at_s"] >= 0 for c in flow)
    assert runner.stats.report("idle")["producers"]["feed"]["delayed"] > 0


async def test_without_flow_control_the_queue_grows(factory: Any, run_pipeline: Any) -> None:
    """The negative control: the same producer and consumer, no flow_control."""
    mod = factory.module("flow_none", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: no-flow
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:feed", to: orders, rate: 2000/s}}
        consumers:
          worker: {{from: orders, handler: "{mod}:work"}}
        """
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    plugin = factory.imported(mod)
    assert max_depth(plugin.PUBLISHED, plugin.FINISHED) > 1500


POLICY = FlowControl.model_validate({"upper": 10, "lower": 5, "delay": 0.02, "every": 0.05})


async def test_a_producer_learns_the_state_before_its_first_publish() -> None:
    broker = MemoryBroker()
    await broker.declare("q")
    listener = FlowListener("q", POLICY, producer="p")
    await listener.start(broker)
    monitor = FlowMonitor("q", POLICY, broker=broker, measured=["q"])
    monitor.state = SLOW  # it finds the queue deep when it starts
    for _ in range(20):
        from runner.brokers import Message

        await broker.publish("q", Message(b"{}", "m"))
    running = asyncio.create_task(monitor.run())
    await asyncio.wait_for(listener.ready(), 1)
    assert listener.state == SLOW and listener.delay() == pytest.approx(0.02)
    monitor.stop()
    await running
    await listener.close()
    await broker.close()


async def test_a_producer_resumes_when_the_monitor_falls_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    import runner.patterns.flow as flow

    monkeypatch.setattr(flow, "silence_limit", lambda policy: 0.2)
    broker = MemoryBroker()
    listener = FlowListener("q", POLICY, producer="p")
    await listener.start(broker)
    monitor = FlowMonitor("q", POLICY, broker=broker, measured=["q"])
    monitor.state = SLOW
    monitor.decide = lambda depth: SLOW  # type: ignore[method-assign]
    running = asyncio.create_task(monitor.run())
    await listener.ready()
    assert listener.delay() > 0
    monitor.stop()  # the monitor dies while producers are slowed
    await running
    await asyncio.sleep(0.3)
    assert listener.delay() == 0.0  # not stuck slowed
    assert listener.state == SLOW  # (it still remembers what it was last told)
    await listener.close()
    await broker.close()


def test_the_monitor_has_hysteresis() -> None:
    monitor = FlowMonitor("q", POLICY, broker=MemoryBroker(), measured=["q"])
    assert monitor.decide(10) == NORMAL  # at upper: not above it
    monitor.state = monitor.decide(11)
    assert monitor.state == SLOW
    assert monitor.decide(6) == SLOW  # between lower and upper: no change
    assert monitor.decide(5) == NORMAL  # at lower: resume
