"""Thread delegate: events of one context run one at a time in publish order; contexts run in parallel."""

from __future__ import annotations

import importlib
import itertools
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.patterns.ordering import Backlog, Dispatcher, context_of

RECORDER = """
import asyncio
import random
import threading
import time

LOG = []          # (context, seq, attempt, worker, start, end, redelivered)
FAIL_ONCE = set()  # ids that fail on their first attempt
SLOW = {}          # id -> seconds
_lock = threading.Lock()


async def handle(event, ctx):
    start = time.monotonic()
    await asyncio.sleep(SLOW.get(event["id"], 0))
    if event["id"] in FAIL_ONCE and ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    with _lock:
        LOG.append((event.get("account"), event["seq"], ctx.attempt, ctx.worker, start, time.monotonic(),
                    ctx.redelivered, ctx.context))
"""


def pipeline(factory, mod: str, *, workers: str, extra: str = "") -> Path:  # type: ignore[no-untyped-def]
    return factory.pipeline(
        f"""
        version: 1
        name: ordered
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: trades}}
        consumers:
          trader:
            from: trades
            handler: "{mod}:handle"
            ordering: by_context(account)
            {workers}
            on_error: {{action: retry, retries: 3, backoff: 5ms}}
            {extra}
        """
    )


def check_order(log: list[tuple], events: list[dict]) -> None:  # type: ignore[type-arg]
    """Per-context publish order, every event handled, no context on two workers at once."""
    done = [entry for entry in log]
    by_context: dict[str, list[tuple]] = {}  # type: ignore[type-arg]
    for entry in done:
        by_context.setdefault(entry[0], []).append(entry)
    expected: dict[str, list[int]] = {}
    for event in events:
        expected.setdefault(event["account"], []).append(event["seq"])
    for account, seqs in expected.items():
        seen = [entry[1] for entry in sorted(by_context[account], key=lambda e: e[4])]
        # at-least-once may repeat a tail after a redelivery, but never reorders.
        assert seen[: len(seqs)] == seqs, (account, seen, seqs)
    for account, entries in by_context.items():
        spans = sorted((e[4], e[5]) for e in entries)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end - 1e-4, f"context {account} ran on two workers at once"


async def test_per_context_order_with_slow_and_failing_events(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    accounts = ["B-123", "Q-665", "T-329", "D-945", "A-136", "V-976"]
    events = [{"id": i, "account": accounts[i % 6 if i % 5 else 0], "seq": 0} for i in range(120)]
    counters: dict[str, int] = {}
    for event in events:
        counters[event["account"]] = counters.get(event["account"], 0) + 1
        event["seq"] = counters[event["account"]]
    jsonl("events.jsonl", events)
    mod = factory.module("ordered", RECORDER)
    module = factory.imported(mod)
    module.SLOW.update({i: 0.02 for i in range(0, 120, 7)})
    module.FAIL_ONCE.update({3, 40, 77})
    code, runner = await run_pipeline(pipeline(factory, mod, workers="concurrency: 4"))
    assert code == 0
    check_order(module.LOG, events)
    assert {e[1] for e in module.LOG if e[0] == "B-123"} == set(range(1, counters["B-123"] + 1))
    stats = runner.stats.consumers["trader"]
    assert stats.processed == 120 and stats.retried == 3 and stats.parked == 0
    assert {e[3] for e in module.LOG} <= {1, 2, 3, 4} and len({e[3] for e in module.LOG}) > 1
    assert all(entry[7] == entry[0] for entry in module.LOG)  # ctx.context is the account


async def test_events_without_the_field_are_independent(factory, jsonl, run_pipeline) -> None:  # type: ignore[no-untyped-def]
    events = [{"id": i, "seq": i} for i in range(20)]
    jsonl("events.jsonl", events)
    mod = factory.module("nofield", RECORDER)
    code, _ = await run_pipeline(pipeline(factory, mod, workers="concurrency: 3"))
    assert code == 0
    log = importlib.import_module(mod).LOG
    assert sorted(e[1] for e in log) == list(range(20))
    assert all(e[7] is None for e in log)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([0.0, 0.0, 0.002, 0.01]), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    workers=st.integers(1, 6),
)
def test_property_random_interleavings_keep_context_order(sync_runs, broker_url, plan, workers) -> None:  # type: ignore[no-untyped-def]
    factory = sync_runs.new()
    events, counters = [], {}
    for index, (context, _, _) in enumerate(plan):
        account = f"C-{context}"
        counters[account] = counters.get(account, 0) + 1
        events.append({"id": index, "account": account, "seq": counters[account]})
    path = factory.folder / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    mod = factory.module("prop", RECORDER)
    module = factory.imported(mod)
    module.SLOW.update({i: delay for i, (_, delay, _) in enumerate(plan)})
    module.FAIL_ONCE.update({i for i, (_, _, fails) in enumerate(plan) if fails})
    code, _ = sync_runs.run(pipeline(factory, mod, workers=f"concurrency: {workers}"))
    assert code == 0
    check_order(module.LOG, events)
    handled = [e[1] for e in module.LOG]
    if broker_url == "memory":
        assert len(handled) == len(events)  # exactly once on the embedded broker
    assert {(e[0], e[1]) for e in module.LOG} == {(e["account"], e["seq"]) for e in events}


def test_dispatcher_allocates_releases_and_balances() -> None:
    dispatcher = Dispatcher("account")
    for worker in (1, 2):
        dispatcher.add_worker(worker)

    class FakeDelivery:
        def __init__(self, account: str) -> None:
            self.body = json.dumps({"account": account}).encode()
            self.headers: dict[str, object] = {}

    from runner.types import Envelope

    made: list[Envelope] = []

    def make(delivery, worker):  # type: ignore[no-untyped-def]
        made.append(Envelope(delivery, worker, 1))
        return made[-1]

    dispatcher._route(FakeDelivery("A"), make)  # type: ignore[arg-type]
    dispatcher._route(FakeDelivery("B"), make)  # type: ignore[arg-type]
    dispatcher._route(FakeDelivery("A"), make)  # type: ignore[arg-type]
    assert dispatcher.allocation_map == {"A": 1, "B": 2}  # new context → least-loaded worker
    assert dispatcher.in_flight[(1, "A")] == 1 and dispatcher.load == {1: 1, 2: 1}
    assert [e.worker for e in made] == [1, 2] and made[0].context == "A"
    assert len(dispatcher.pending["A"]) == 1  # A's second event waits for the first
    dispatcher._release(2, "B")
    assert "B" not in dispatcher.allocation_map  # released at 0
    dispatcher._release(1, "A")
    # A's next event goes to the least-loaded worker now: worker 1 (load 0, lower id than 2).
    assert dispatcher.allocation_map == {"A": 1} and [e.worker for e in made] == [1, 2, 1]
    assert "A" not in dispatcher.pending
    dispatcher.add_worker(3)
    dispatcher.load[1] = 5  # busy elsewhere
    dispatcher._route(FakeDelivery("C"), make)  # type: ignore[arg-type]
    assert dispatcher.allocation_map["C"] in (2, 3)
    assert context_of(b"not json", "account") is None and context_of(b'{"a": {"b": 3}}', "a.b") == 3


async def test_a_backlog_blocks_one_context_only() -> None:
    lanes = Backlog()
    from runner.types import Envelope

    first, second = Envelope(None, 1, 1), Envelope(None, 1, 1)  # type: ignore[arg-type]
    lanes.put("A", first)
    lanes.put("B", second)
    key, envelope = await lanes.next()  # type: ignore[misc]
    assert (key, envelope) == ("A", first)
    lanes.block("A", 0.05)
    key, envelope = await lanes.next()  # type: ignore[misc]
    assert (key, envelope) == ("B", second)  # A waits, B goes on
    lanes.pop("B")
    key, envelope = await lanes.next()  # type: ignore[misc]
    assert (key, envelope) == ("A", first)  # after the back-off
