"""`edarun status` and `edarun up --json`, driven as a user drives them: a subprocess per command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import PipelineFactory

HANDLERS = """
import time


def feed():
    for i in range(100_000):
        yield {"id": i, "kind": "CANCEL" if i % 7 == 0 else "BUY"}


def work(event, ctx):
    time.sleep(0.01)
    if event["id"] % 10 == 3:
        raise ValueError(f"refusing {event['id']}")
"""


def edarun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, timeout=timeout
    )


def slow_pipeline(factory: PipelineFactory, tag: str, *, count: int | None = None) -> Path:
    """feed → <tag>-orders (a priority lane, flow control) → a consumer slower than the feed, which
    parks every tenth event."""
    mod = factory.module("status_work", HANDLERS)
    cap = f", count: {count}" if count is not None else ""
    return factory.pipeline(
        f"""
        version: 1
        name: {tag}
        plugins: [plugins]
        queues:
          {tag}-orders: {{flow_control: upper 60 lower 30}}
        producers:
          {tag}-feed: {{source: "{mod}:feed", rate: 150/s, to: {tag}-orders{cap}}}
        consumers:
          {tag}-worker:
            from: {tag}-orders
            handler: "{mod}:work"
            priority_lane: 'when(kind == "CANCEL")'
            on_error: dead_letter
        """
    )


def test_up_json_prints_the_status_as_json_lines(factory: PipelineFactory) -> None:
    path = slow_pipeline(factory, "json-lines", count=40)
    result = edarun("up", str(path), "--until-idle", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) >= 2  # the first poll, then every second, then the last with the outcome
    assert all("outcome" not in line for line in lines[:-1])
    last = lines[-1]
    assert last["outcome"] == "idle" and last["from"] == "up" and last["brokers"] == ["memory"]
    assert set(last) >= {"pipeline", "sources", "elapsed_s", "producers", "queues", "consumers", "parked"}
    assert last["producers"]["json-lines-feed"] == {
        "to": ["json-lines-orders"], "published": 40, "rejected": 0, "delayed": 0, "done": True,
    }  # fmt: skip
    assert last["queues"]["json-lines-orders"] == {
        "depth": 0, "max_depth": last["queues"]["json-lines-orders"]["max_depth"], "lane_depth": 0,
        "flow": "normal",
    }  # fmt: skip
    worker = last["consumers"]["json-lines-worker"]
    assert (worker["processed"], worker["parked"], last["parked"]) == (36, 4, 4)
    assert set(worker["latency_ms"]) == {"p50", "p99"} and worker["latency_ms"]["p50"] >= 10
    assert "json-lines: idle after" in result.stderr  # the summary stays on stderr
