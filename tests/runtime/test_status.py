"""The status document: built from a run's counters, and merged from several `up`s."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from status_sample import loaded_pipeline, running_stats

from runner.brokers import BrokerError, Message
from runner.runtime.stats import ConsumerStats, ProducerStats, RunStats
from runner.runtime.status import StatusBroadcaster, StatusBuilder, merge


def test_the_snapshot_folds_lanes_into_their_queue(tmp_path: Path) -> None:
    builder = StatusBuilder(loaded_pipeline(tmp_path), ["amqp://bob:hunter2@rabbit:5672/"], source="m:1")
    doc = builder.snapshot(running_stats())
    assert json.loads(json.dumps(doc)) == doc  # JSON as it is
    assert doc["pipeline"] == "trading" and doc["from"] == "up" and doc["sources"] == ["m:1"]
    assert doc["brokers"] == ["amqp://bob:***@rabbit:5672/"]
    assert doc["producers"]["feed"] == {
        "to": ["trades"], "published": 1000, "rejected": 2, "delayed": 40, "done": False,
    }  # fmt: skip
    assert list(doc["queues"]) == ["trades", "confirmations", "processor.workflow"]
    assert doc["queues"]["trades"] == {"depth": 12, "max_depth": 412, "lane_depth": 7, "flow": "slow"}
    assert doc["queues"]["confirmations"] == {"depth": 0, "max_depth": 0}
    processor = doc["consumers"]["processor"]
    assert processor["queue"] == "trades"
    assert processor["latency_ms"] == {"p50": 5.0, "p99": 250.0}
    counts = {k: processor[k] for k in ("consumers", "in_flight", "processed", "failed", "retried")}
    assert counts == {"consumers": 4, "in_flight": 3, "processed": 990, "failed": 30, "retried": 20}
    assert (processor["repaired"], processor["parked"], processor["restarts"]) == (5, 10, 2)
    assert doc["consumers"]["settlement"]["latency_ms"] == {"p50": None, "p99": None}
    assert doc["parked"] == 10


def test_the_rate_is_over_the_last_seconds(tmp_path: Path) -> None:
    builder = StatusBuilder(loaded_pipeline(tmp_path), ["memory"])
    rates = builder.rates
    assert rates.rate("c", 0, now=10.0) == 0.0
    assert rates.rate("c", 100, now=11.0) == 100.0
    assert rates.rate("c", 100, now=16.0) == 0.0  # nothing in the last seconds


def test_flow_is_said_only_where_this_up_runs_the_monitor(tmp_path: Path) -> None:
    loaded = loaded_pipeline(tmp_path)
    stats = running_stats()

    def trades(*only: str) -> dict[str, Any]:
        queues: dict[str, Any] = StatusBuilder(loaded, ["memory"], only=only).snapshot(stats)["queues"]
        return dict(queues["trades"])

    assert trades("trades.flow")["flow"] == "slow"
    assert "flow" not in trades("processor")  # another `up` runs the flow monitor: it says
    stats.flow_changed("trades", "resume", 40)
    assert trades()["flow"] == "normal"


def test_several_ups_merge_into_one_document(tmp_path: Path) -> None:
    loaded = loaded_pipeline(tmp_path)
    # Two machines: one runs the producer, the flow monitor and an instance of the processor...
    first = RunStats(pipeline="trading")
    first.producers["feed"] = ProducerStats(published=600, delayed=3, done=True)
    a = first.consumers["processor"] = ConsumerStats(processed=100, consumers=2, parked=1)
    for _ in range(100):
        a.timed(0.003)
    first.observe_depth("trades", 50)
    first.observe_depth("trades", 30)
    first.flow_changed("trades", "slow", 50)
    # ... the other the other instance of the processor and the settlement, newer by a moment.
    second = RunStats(pipeline="trading")
    b = second.consumers["processor"] = ConsumerStats(processed=50, consumers=3, restarts=1)
    for _ in range(100):
        b.timed(0.4)
    second.consumers["settlement"] = ConsumerStats(processed=140, consumers=1)
    second.observe_depth("trades", 20)
    messages: list[dict[str, Any]] = [
        StatusBuilder(loaded, ["amqp://h/"], only=["feed", "trades.flow", "processor"], source="a:1").message(
            first
        ),
        StatusBuilder(loaded, ["amqp://h/"], only=["processor", "settlement"], source="b:2").message(second),
    ]
    messages[1]["status"]["at"] = messages[0]["status"]["at"] + 0.5
    doc = merge(list(reversed(messages)))
    assert doc["sources"] == ["a:1", "b:2"] and doc["brokers"] == ["amqp://h/"]
    assert doc["producers"]["feed"]["published"] == 600 and doc["producers"]["feed"]["done"]
    processor = doc["consumers"]["processor"]
    assert (processor["processed"], processor["consumers"], processor["parked"]) == (150, 5, 1)
    assert processor["restarts"] == 1
    # Half the calls took 3 ms, half 400 ms: the merged buckets say so, not either side's.
    assert processor["latency_ms"] == {"p50": 5.0, "p99": 500.0}
    assert doc["consumers"]["settlement"]["processed"] == 140
    # The newest depth, the largest max depth, the flow state of the `up` running the monitor.
    assert doc["queues"]["trades"] == {"depth": 20, "max_depth": 50, "lane_depth": 0, "flow": "slow"}
    assert doc["parked"] == 1


class SlowBroker:
    """A broker whose broadcasts hang (a lagging RabbitMQ) or fail (one that is down)."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.said: list[tuple[str, dict[str, Any]]] = []

    async def broadcast(self, exchange: str, message: Message) -> None:
        self.said.append((exchange, json.loads(message.body)))
        if self.fail:
            raise BrokerError("down")
        await asyncio.sleep(3600)


async def test_broadcasts_are_best_effort(tmp_path: Path) -> None:
    builder = StatusBuilder(loaded_pipeline(tmp_path), ["memory"], source="m:1")
    stats = running_stats()
    failing = SlowBroker(fail=True)
    broadcaster = StatusBroadcaster(failing, builder, every=0.0)  # type: ignore[arg-type]
    for _ in range(3):
        broadcaster.offer(stats)  # returns at once; the failure stays in its task
        await asyncio.sleep(0.01)
    assert len(failing.said) == 3
    exchange, message = failing.said[0]
    assert exchange == "trading.status" and message["format"] == 1
    assert message["status"]["sources"] == ["m:1"] and len(message["buckets"]["processor"]) == 15
    await broadcaster.close()

    hanging = SlowBroker(fail=False)
    broadcaster = StatusBroadcaster(hanging, builder, every=0.0)  # type: ignore[arg-type]
    for _ in range(3):
        broadcaster.offer(stats)  # one at a time: the run never queues up broadcasts
        await asyncio.sleep(0.01)
    assert len(hanging.said) == 1
    await asyncio.wait_for(broadcaster.close(), 1.0)
