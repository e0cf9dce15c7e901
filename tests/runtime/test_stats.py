"""Handler durations: counted per bucket in each service, merged by the supervisor, reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.runtime.stats import HANDLER_BUCKETS_S, ConsumerStats


def test_durations_fall_in_buckets_and_give_percentiles() -> None:
    stats = ConsumerStats()
    for _ in range(98):
        stats.timed(0.003)  # under 5 ms
    stats.timed(0.2)
    stats.timed(30.0)  # slower than the last bound
    assert sum(stats.handler_buckets) == stats.handler_calls == 100
    assert stats.handler_buckets[-1] == 1
    assert stats.latency(0.5) == 0.005
    assert stats.latency(0.99) == 0.25
    assert stats.latency(1.0) == float("inf")
    assert stats.handler_ms() == {
        "mean": round((98 * 0.003 + 0.2 + 30.0) / 100 * 1000, 3),
        "p50": 5.0,
        "p99": 250.0,
    }
    assert ConsumerStats().latency(0.5) is None
    assert len(stats.handler_buckets) == len(HANDLER_BUCKETS_S) + 1


HANDLER = """
import time


def feed():
    for i in range(40):
        yield {"id": i}


def work(event, ctx):
    time.sleep(0.012)
"""


async def test_the_report_has_handler_durations(
    factory: Any, run_pipeline: Any, broker_url: str, tmp_path: Path
) -> None:
    mod = factory.module("timed", HANDLER)
    path = factory.pipeline(
        f"""
        version: 1
        name: timed
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:feed", to: timed-work}}
        consumers:
          worker: {{from: timed-work, handler: "{mod}:work", concurrency: 4}}
        """
    )
    report = tmp_path / "report.json"
    code, _ = await run_pipeline(path, report=report)
    assert code == 0
    handler = json.loads(report.read_text())["consumers"]["worker"]["handler_ms"]
    assert handler["mean"] >= 12.0
    assert handler["p50"] == 25.0  # 12 ms falls in the bucket up to 25 ms
