"""A broker of a multi-broker pipeline (pattern 9) stopped mid-run: `rabbitmqctl stop_app` on the
second node while `edarun up` runs a producer and a consumer on both brokers, `start_app` seconds
later. Producers go on with the broker that is up; what the stopped broker had confirmed waits on
its disk and is consumed once it is back; `--until-idle` does not end while it is away.

The handler appends `<id> <broker> <time>` per call with one `os.write` (see conftest).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import AMQP_URL, delete_queues

from runner.brokers.amqp import AmqpBroker

from .conftest import Scenario, read_report

EVENTS = 6_000
RATE = 2_000  # events/s: 3 s of publishing, faster than the consumer, so each broker has a backlog
PREFETCH = 50
HANDLER = """
import os
import time

_LOG = os.open(os.environ["EDARUN_FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def handle(event, ctx):
    time.sleep(0.001)
    os.write(_LOG, f"{event['id']} {ctx.broker} {time.time():.3f}\\n".encode())
"""


def test_a_broker_stopped_mid_run_loses_nothing(scenario: Scenario, second_node: Any, tmp_path: Path) -> None:
    import asyncio

    urls = [AMQP_URL, second_node.url]
    asyncio.run(delete_queues(scenario.queues, second_node.url))
    scenario.factory.data("events.jsonl", "".join(f'{{"id": {i}}}\n' for i in range(EVENTS)))
    module = scenario.factory.module("multi_fault", HANDLER)
    consumer = {"from": scenario.queue, "handler": f"{module}:handle", "prefetch": PREFETCH, "concurrency": 2}
    scenario.path = scenario.factory.pipeline(
        f"""
        version: 1
        name: {scenario.tag}
        brokers: {json.dumps(urls)}
        plugins: [plugins]
        producers:
          {scenario.producer}: {{source: file(events.jsonl), to: {scenario.queue}, rate: {RATE}/s}}
        consumers:
          {scenario.consumer}: {json.dumps(consumer)}
        """
    )
    report = tmp_path / "report.json"
    up = scenario.up(report, broker=None)
    scenario.wait_calls(EVENTS // 6, up)
    try:
        second_node.stop_app()  # returns once the broker is stopped and its connections closed
        stopped_at = time.time()
        time.sleep(3)
    finally:
        started_at = time.time()
        second_node.start_app()
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)

    lines = [line.split() for line in scenario.log.read_text().splitlines()]
    calls = Counter(int(ident) for ident, _, _ in lines)
    assert set(calls) == set(range(EVENTS)), f"{EVENTS - len(calls)} events never processed"
    # At least once: what was in flight when it stopped may come twice (an unconfirmed publish
    # sent to the other broker, an unacknowledged delivery given again), nothing more.
    assert sum(calls.values()) - len(calls) <= AmqpBroker.publish_window + 2 * PREFETCH
    b = second_node.url.replace("guest:guest@", "guest:***@")
    during = [broker for _, broker, at in lines if stopped_at + 0.2 < float(at) < started_at]
    assert during and b not in during, "nothing was consumed from the other broker meanwhile"
    after = [ident for ident, broker, at in lines if broker == b and float(at) > started_at]
    assert after, "the stopped broker's backlog was not consumed after it came back"
    data = read_report(report)
    assert data["outcome"] == "idle"
    assert data["producers"][scenario.producer] == {"published": EVENTS, "rejected": 0}
    log = report.with_suffix(".err").read_text(errors="replace")
    assert "is down; publishing to the others" in log and "is back" in log, scenario.stderr(report)
