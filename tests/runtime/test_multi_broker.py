"""Pipelines on several brokers (pattern 9), end to end: on `memory://a` + `memory://b` in one
process, and on RabbitMQ plus a second node of the session's own, in one process and as `edarun up`
runs one process per service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AMQP_URL, PipelineFactory, delete_queues

from runner.brokers import Depth
from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions, queues_of
from runner.runtime.dashboard import dashboard_queue
from runner.traces_view import load_traces

RECORDER = """
from collections import Counter, defaultdict

BROKERS = Counter()
ORDER = defaultdict(list)  # account → seq, in the order handled
WHERE = defaultdict(set)  # account → the brokers its events came from


def feed():
    for n in range({events}):
        yield {{"n": n, "account": f"acct-{{n % {contexts}}}", "seq": n // {contexts}}}


def record(event, ctx):
    BROKERS[ctx.broker] += 1
    ORDER[event["account"]].append(event["seq"])
    WHERE[event["account"]].add(ctx.broker)
"""


def write(factory: PipelineFactory, urls: list[str], *, events: int, contexts: int, consumer: str,
          spread: str = "round_robin", extra: str = "") -> tuple[Path, str]:  # fmt: skip
    module = factory.module("multi_recorder", RECORDER.format(events=events, contexts=contexts))
    path = factory.pipeline(
        f"""
        version: 1
        name: multi-{factory.suffix}
        brokers: {json.dumps(urls)}
        spread: {spread}
        plugins: [plugins]
        {extra}
        producers:
          feed: {{source: "{module}:feed", to: work-{factory.suffix}}}
        consumers:
          sink: {{from: work-{factory.suffix}, handler: "{module}:record", {consumer}}}
        """
    )
    return path, module


@pytest.fixture
async def run_on(multi_urls: list[str]) -> AsyncIterator[Callable[..., Any]]:
    """Run a pipeline in this process until idle; on RabbitMQ its queues are deleted on both
    brokers before and after."""
    used: list[str] = []

    async def clear(names: list[str]) -> None:
        if multi_urls[0] == AMQP_URL:
            for url in multi_urls:
                await delete_queues(names, url)

    async def run(path: Path, **options: Any) -> tuple[int, Runner]:
        loaded = load_pipeline(path)
        names = [*queues_of(loaded), *(dashboard_queue(c) for c in loaded.model.consumers)]
        await clear(names)
        used.extend(names)
        runner = Runner(loaded, RunOptions(until_idle=True, **options))
        return await asyncio.wait_for(runner.run(), 120), runner

    yield run
    await clear(used)


def redacted(url: str) -> str:
    return url.replace("guest:guest@", "guest:***@")


async def test_round_robin_splits_20k_events_evenly_over_both_brokers(
    factory: PipelineFactory, multi_urls: list[str], run_on: Callable[..., Any], tmp_path: Path
) -> None:
    path, module = write(factory, multi_urls, events=20_000, contexts=100, consumer="concurrency: 4")
    report = tmp_path / "report.json"
    code, _ = await run_on(path, report=report)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["producers"]["feed"] == {"published": 20_000, "rejected": 0}
    brokers = factory.imported(module).BROKERS
    assert set(brokers) == {redacted(url) for url in multi_urls}  # ctx.broker: where it came from
    assert sum(brokers.values()) == data["consumers"]["sink"]["processed"] >= 20_000
    assert all(9_000 <= count <= 11_000 for count in brokers.values()), brokers


async def test_by_context_keeps_each_account_on_one_broker_and_in_order(
    factory: PipelineFactory, multi_urls: list[str], run_on: Callable[..., Any]
) -> None:
    path, module = write(
        factory, multi_urls, events=3_000, contexts=24, spread="by_context(account)",
        consumer="concurrency: 6, ordering: by_context(account)",
    )  # fmt: skip
    code, _ = await run_on(path)
    assert code == 0
    recorded = factory.imported(module)
    assert len(recorded.ORDER) == 24
    assert all(seqs == sorted(seqs) for seqs in recorded.ORDER.values()), "an account out of order"
    assert all(len(brokers) == 1 for brokers in recorded.WHERE.values())
    assert set(recorded.BROKERS) == {redacted(url) for url in multi_urls}  # both carry accounts


async def test_spans_name_the_broker_that_took_and_gave_each_event(
    factory: PipelineFactory, run_on: Callable[..., Any], multi_urls: list[str], tmp_path: Path
) -> None:
    path, _ = write(
        factory, multi_urls, events=40, contexts=4, consumer="concurrency: 1",
        extra="telemetry: {traces: file(traces.jsonl)}",
    )  # fmt: skip
    code, _ = await run_on(path)
    assert code == 0
    traces = load_traces(tmp_path / "traces.jsonl")
    assert len(traces) == 40
    for spans in traces.values():
        send = next(s for s in spans if s["kind"] == 4)
        process = next(s for s in spans if s["kind"] == 5)
        assert send["attributes"]["edarun.broker"] == process["attributes"]["edarun.broker"]
    sends = [next(s for s in spans if s["kind"] == 4) for spans in traces.values()]
    took = Counter(send["attributes"]["edarun.broker"] for send in sends)
    assert took == {redacted(url): 20 for url in multi_urls}  # in turns


def test_idle_waits_for_a_broker_whose_depth_is_unknown(factory: PipelineFactory) -> None:
    """A broker that is down may hold events on its disk: its queue is not empty until it answers."""
    path, _ = write(factory, ["memory://a", "memory://b"], events=1, contexts=1, consumer="concurrency: 1")
    runner = Runner(load_pipeline(path), RunOptions(until_idle=True))  # no producer started: all done
    queue = f"work-{factory.suffix}"
    assert runner._idle({queue: Depth(0, 0)}, {queue}, [])
    assert not runner._idle({queue: Depth(0, 0, complete=False)}, {queue}, [])
    assert runner._idle({"elsewhere": Depth(0, 0, complete=False)}, {queue}, [])  # not one it waits for


def test_by_context_order_holds_across_processes_on_rabbitmq(
    factory: PipelineFactory, second_node: Any, tmp_path: Path
) -> None:
    """`edarun up` on two RabbitMQ brokers: the producer and the ordered consumer in processes of
    their own, each with its own multi-broker connections."""
    log = tmp_path / "calls.log"
    module = factory.module(
        "multi_ordered",
        f"""
        import os
        _LOG = os.open({str(log)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        def feed():
            for n in range(4000):
                yield {{"n": n, "account": f"acct-{{n % 30}}", "seq": n // 30}}

        def handle(event, ctx):
            os.write(_LOG, f"{{event['account']}} {{event['seq']}} {{ctx.broker}}\\n".encode())
        """,
    )
    queue = f"ordered-{factory.suffix}"
    urls = [AMQP_URL, second_node.url]
    path = factory.pipeline(
        f"""
        version: 1
        name: multi-ordered-{factory.suffix}
        brokers: {json.dumps(urls)}
        spread: by_context(account)
        plugins: [plugins]
        producers:
          feed: {{source: "{module}:feed", to: {queue}}}
        consumers:
          sink: {{from: {queue}, handler: "{module}:handle", concurrency: 4, ordering: by_context(account)}}
        """
    )
    names = [queue, "sink.dashboard"]
    for url in urls:
        asyncio.run(delete_queues(names, url))
    try:
        command = [sys.executable, "-m", "runner", "up", str(path), "--until-idle"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        for url in urls:
            asyncio.run(delete_queues(names, url))
    assert result.returncode == 0, result.stderr[-3000:]
    order: dict[str, list[int]] = defaultdict(list)
    where: dict[str, set[str]] = defaultdict(set)
    for line in log.read_text().splitlines():
        account, seq, broker = line.split()
        order[account].append(int(seq))
        where[account].add(broker)
    assert len(order) == 30 and sum(map(len, order.values())) >= 4000
    first = {a: list(dict.fromkeys(seqs)) for a, seqs in order.items()}  # first handling of each
    assert all(seqs == sorted(seqs) for seqs in first.values()), "an account out of order"
    assert all(len(brokers) == 1 for brokers in where.values())
    assert {b for brokers in where.values() for b in brokers} == {redacted(u) for u in urls}
