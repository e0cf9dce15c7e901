"""`edarun status` and `edarun up --json`, driven as a user drives them: a subprocess per command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import AMQP_URL, PipelineFactory, amqp_available, delete_queues

from runner.config.loader import load_pipeline
from runner.redact import redact_url
from runner.runtime.app import queues_of
from runner.runtime.dashboard import dashboard_queue

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


def test_status_on_the_memory_broker_says_why_not(factory: PipelineFactory) -> None:
    path = slow_pipeline(factory, "status-memory")
    result = edarun("status", str(path))
    assert result.returncode == 2
    assert "memory broker" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_status_with_an_unreachable_broker_is_one_line(factory: PipelineFactory) -> None:
    path = slow_pipeline(factory, "status-away")
    broker = "amqp://bob:hunter2@127.0.0.1:1/"
    result = edarun("status", str(path), "--broker", broker, "--connect-timeout", "2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach broker amqp://bob:***@127.0.0.1:1/" in lines[0], lines
    assert "hunter2" not in result.stderr


def _status(path: Path, *extra: str) -> dict[str, Any]:
    result = edarun("status", str(path), "--broker", AMQP_URL, "--json", *extra)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _up(path: Path, folder: Path, *only: str) -> subprocess.Popen[bytes]:
    """`edarun up --only …` on RabbitMQ; its report and stderr go to report-/up-<first name>."""
    command = [sys.executable, "-m", "runner", "up", str(path), "--broker", AMQP_URL]
    for name in only:
        command += ["--only", name]
    command += ["--report", str(folder / f"report-{only[0]}.json")]
    with (folder / f"up-{only[0]}.err").open("wb") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)


@pytest.fixture
def amqp_pipeline(factory: PipelineFactory) -> Any:
    """A slow pipeline with names of this test's own on RabbitMQ, deleted before and after."""
    amqp_available()
    tag = f"status-{os.getpid()}"
    path = slow_pipeline(factory, tag)
    loaded = load_pipeline(path)
    names = [*queues_of(loaded), dashboard_queue(f"{tag}-worker")]
    asyncio.run(delete_queues(names))
    yield tag, path
    asyncio.run(delete_queues(names))


def test_status_hears_every_running_up_then_falls_back_to_the_broker(
    amqp_pipeline: tuple[str, Path], tmp_path: Path
) -> None:
    tag, path = amqp_pipeline
    feed, worker, queue = f"{tag}-feed", f"{tag}-worker", f"{tag}-orders"
    # Two `up`s of one pipeline, as on two machines: the feed with its flow monitor, and the worker.
    ups = {feed: _up(path, tmp_path, feed, f"{queue}.flow"), worker: _up(path, tmp_path, worker)}
    try:
        deadline = time.monotonic() + 45
        while True:
            document = _status(path, "--wait", "5")
            heard = document["from"] == "up" and len(document["sources"]) == 2
            if heard and document["consumers"].get(worker, {}).get("processed", 0) >= 20:
                break
            assert time.monotonic() < deadline, f"no status of both ups in time: {document}"
            for name, up in ups.items():
                assert up.poll() is None, (tmp_path / f"up-{name}.err").read_text()[-2000:]

        assert document["brokers"] == [redact_url(AMQP_URL)]
        assert set(document["producers"]) == {feed} and set(document["consumers"]) == {worker}
        assert document["producers"][feed]["published"] > 0
        entry = document["queues"][queue]
        assert set(entry) == {"depth", "max_depth", "lane_depth", "flow"}
        assert entry["flow"] in ("slow", "normal") and entry["max_depth"] >= entry["depth"] >= 0
        consumer = document["consumers"][worker]
        assert consumer["queue"] == queue and consumer["consumers"] == 1
        assert consumer["latency_ms"]["p50"] is not None and consumer["parked"] >= 1
        assert document["parked"] == consumer["parked"]

        table = edarun("status", str(path), "--broker", AMQP_URL)
        assert table.returncode == 0, table.stderr
        assert f"edarun · {tag} · " in table.stdout and "2 edarun up" in table.stdout
        assert redact_url(AMQP_URL) in table.stdout and AMQP_URL not in table.stdout
        assert worker in table.stdout and "p99 ms" in table.stdout and "lane" in table.stdout
    finally:
        for up in ups.values():
            up.send_signal(signal.SIGTERM)
        for up in ups.values():
            up.wait(timeout=60)

    parked = json.loads((tmp_path / f"report-{worker}.json").read_text())["consumers"][worker]["parked"]
    fallback = _status(path, "--wait", "1")
    assert fallback["from"] == "broker" and fallback["sources"] == []
    assert "no running edarun up answered" in fallback["note"]
    assert fallback["queues"][queue]["depth"] > 0 and fallback["queues"][queue]["lane_depth"] >= 0
    assert fallback["consumers"][worker] == {"queue": queue, "parked": parked}
    assert fallback["parked"] == parked
    table = edarun("status", str(path), "--broker", AMQP_URL, "--wait", "1")
    assert table.returncode == 0 and "no running edarun up answered within 1s" in table.stdout
