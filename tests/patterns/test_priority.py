"""Ambulance / carpool: priority events overtake the standard backlog, never their own context."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from runner.patterns.priority import AFTER, SEQUENCE, OrderGuard, Sequencer, lane_queue

HANDLERS = """
import asyncio
import threading
import time

LOG = []  # (id, kind, account, ctx.lane, ctx.worker, ctx.queue, start, end)
_lock = threading.Lock()


async def handle(event, ctx):
    start = time.monotonic()
    await asyncio.sleep(event.get("work", 0.001))
    with _lock:
        LOG.append((event["id"], event["kind"], event.get("account"), ctx.lane, ctx.worker, ctx.queue,
                    start, time.monotonic()))


def backlog_then_priority():
    for i in range(1000):
        yield {"id": i, "kind": "S"}
    for i in range(1000, 1010):
        yield {"id": i, "kind": "P"}


def trades():
    # Accounts A-0 … A-599 place one order each; then ten cancels: five of orders at the head of
    # the backlog, five of orders at its very end.
    for i in range(600):
        yield {"id": i, "kind": "PLACE", "account": f"A-{i}", "work": 0.005}
    for n, i in enumerate([0, 1, 2, 3, 4, 595, 596, 597, 598, 599]):
        yield {"id": 1000 + n, "kind": "CANCEL", "account": f"A-{i}"}


DIED = []


async def p_then_s(ctx):
    await asyncio.sleep(0.2)
    yield {"id": 1, "kind": "P", "work": 0.5, "sent_at": time.time()}
    await asyncio.sleep(0.05)
    yield {"id": 2, "kind": "S", "sent_at": time.time()}


async def timed(event, ctx):
    waited = time.time() - event["sent_at"]
    await asyncio.sleep(event.get("work", 0.001))
    with _lock:
        LOG.append((event["id"], ctx.lane, ctx.worker, waited))


def handle_sync(event, ctx):
    # A blocking handler: a carpool worker needs a thread of its own, not a standard worker's.
    start = time.monotonic()
    time.sleep(0.2 if event["kind"] == "S" else 0)
    with _lock:
        LOG.append((event["id"], event["kind"], None, ctx.lane, ctx.worker, ctx.queue, start,
                    time.monotonic()))


def few():
    for i in range(3):
        yield {"id": i, "kind": "S"}
    yield {"id": 3, "kind": "P"}


async def dies_once(event, ctx):
    if event["id"] == 300 and not DIED:
        DIED.append(ctx.worker)
        raise SystemExit("a worker dies")
    await handle(event, ctx)


def relay(event, ctx):
    ctx.publish("work", event, priority=event["kind"] == "P")
"""


def lane_pipeline(
    factory: Any, mod: str, lane: str, *, source: str = "backlog_then_priority", extra: str = ""
) -> Path:
    return factory.pipeline(
        f"""
        version: 1
        name: lanes
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:{source}", to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:handle"
            priority_lane: {lane}
            {extra}
        """
    )


def positions(log: list[tuple[Any, ...]]) -> dict[int, int]:
    """Event id → how many standard events had finished before it finished."""
    done, standard = {}, 0
    for entry in sorted(log, key=lambda e: e[7]):
        done[entry[0]] = standard
        if entry[3] == "standard":
            standard += 1
    return done


async def test_priority_events_overtake_the_backlog(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("ambulance", HANDLERS)
    code, runner = await run_pipeline(lane_pipeline(factory, mod, "when(kind == 'P')"))
    assert code == 0
    log = factory.imported(mod).LOG
    assert sorted(e[0] for e in log) == list(range(1010))  # everything, once
    where = positions(log)
    late = {i: where[i] for i in range(1000, 1010) if where[i] >= 600}
    assert not late, f"priority events that waited behind 60% of the backlog: {late}"
    assert {e[3] for e in log if e[1] == "P"} == {"priority"}
    assert {e[3] for e in log if e[1] == "S"} == {"standard"}
    assert {e[5] for e in log} == {"work"}  # ctx.queue is the consumer's queue, on either lane
    stats = runner.stats.consumers["worker"]
    assert (stats.processed, stats.priority) == (1010, 10)
    report = runner.stats.report("idle")["consumers"]["worker"]
    assert report["lanes"] == {"standard": 1000, "priority": 10}
    assert runner.stats.max_depth.get(lane_queue("work"), 0) <= 10


async def test_marked_events_take_the_lane(factory: Any, run_pipeline: Any) -> None:
    """`priority_lane: true`: a producer's `priority: when(...)` and `ctx.publish(priority=True)`."""
    mod = factory.module("marked", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: marked
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:backlog_then_priority", to: incoming, priority: "when(id % 100 == 7)"}}
        consumers:
          relay: {{from: incoming, handler: "{mod}:relay", priority_lane: true}}
          worker: {{from: work, handler: "{mod}:handle", priority_lane: true}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert runner.stats.consumers["relay"].priority == 11  # ids 7, 107, …, 907 and 1007
    log = factory.imported(mod).LOG
    assert sorted(e[0] for e in log if e[3] == "priority") == list(range(1000, 1010))
    assert runner.stats.consumers["worker"].priority == 10


async def test_a_standard_event_never_waits_for_a_busy_ambulance(
    factory: Any, run_pipeline: Any, broker_url: str
) -> None:
    """P keeps worker 1 busy; S, published while it runs, goes to idle worker 2 at once."""
    mod = factory.module("two_ambulances", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: two-ambulances
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:p_then_s", to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:timed", concurrency: 2, priority_lane: "when(kind == 'P')"}}
        """
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    (p, s) = sorted(factory.imported(mod).LOG)
    assert p[1] == "priority" and s[1] == "standard"
    if broker_url == "memory":
        # RabbitMQ pushes a message to any consumer with room in its prefetch window, busy or not
        # (with or without a lane); the memory broker hands it to a worker that is waiting.
        assert p[2] != s[2] and s[3] < 0.2, f"S waited {s[3]:.3f}s for the busy worker"


async def test_carpool_workers_take_only_the_lane(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("carpool", HANDLERS)
    path = lane_pipeline(
        factory, mod, "{when: \"kind == 'P'\", mode: carpool, carpool: 1}", extra="concurrency: 2"
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    log = factory.imported(mod).LOG
    assert len(log) == 1010
    priority_workers = {e[4] for e in log if e[3] == "priority"}
    standard_workers = {e[4] for e in log if e[3] == "standard"}
    assert len(priority_workers) == 1 and len(standard_workers) == 2
    assert not priority_workers & standard_workers, "a carpool worker took a standard event"
    where = positions(log)
    assert all(where[i] < 600 for i in range(1000, 1010))
    assert runner.stats.consumers["worker"].max_consumers == 3


async def test_a_sync_carpool_worker_has_a_thread_of_its_own(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("carpool_sync", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: carpool-sync
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:few", to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:handle_sync"
            priority_lane: {{when: "kind == 'P'", mode: carpool}}
        """
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    log = {e[0]: e for e in factory.imported(mod).LOG}
    # P, published right after S0, ran while S0 was still running: on a thread of its own.
    assert log[3][6] < log[0][7], "the carpool worker waited for the standard worker's thread"


async def test_ordering_a_cancel_never_overtakes_its_place(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("ordered_lane", HANDLERS)
    path = lane_pipeline(
        factory,
        mod,
        "when(kind == 'CANCEL')",
        source="trades",
        extra="ordering: by_context(account)\n            concurrency: 4",
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    log = factory.imported(mod).LOG
    assert len(log) == 610
    finished = {e[0]: (e[6], e[7]) for e in log}
    for n, i in enumerate([0, 1, 2, 3, 4, 595, 596, 597, 598, 599]):
        cancel, place = finished[1000 + n], finished[i]
        assert cancel[0] >= place[1], f"CANCEL A-{i} started before its PLACE finished"
    where = positions(log)
    # The cancels of orders at the head of the backlog did not wait for the rest of it.
    early = {n: where[1000 + n] for n in range(5)}
    assert all(p < 0.6 * 600 for p in early.values()), early


async def test_ordering_with_carpool_keeps_contexts_apart(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("ordered_carpool", HANDLERS)
    path = lane_pipeline(
        factory,
        mod,
        "{when: \"kind == 'CANCEL'\", mode: carpool, carpool: 2}",
        source="trades",
        extra="ordering: by_context(account)\n            concurrency: 2",
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    log = factory.imported(mod).LOG
    finished = {e[0]: (e[6], e[7]) for e in log}
    for n, i in enumerate([0, 1, 2, 3, 4, 595, 596, 597, 598, 599]):
        assert finished[1000 + n][0] >= finished[i][1], f"CANCEL A-{i} ran before its PLACE"
    priority_workers = {e[4] for e in log if e[3] == "priority"}
    standard_workers = {e[4] for e in log if e[3] == "standard"}
    assert priority_workers and not priority_workers & standard_workers


@pytest.mark.parametrize("lane", ["false", "when(kind == 'CANCEL')"])
async def test_a_dead_ordered_worker_restarts_the_pool(factory: Any, run_pipeline: Any, lane: str) -> None:
    """SystemExit in a handler takes the ordered pool down; it comes back and nothing is lost."""
    mod = factory.module("dying", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: dying
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:trades", to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:dies_once"
            ordering: by_context(account)
            concurrency: 4
            priority_lane: {lane}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert factory.imported(mod).DIED
    assert {e[0] for e in factory.imported(mod).LOG} == {*range(600), *range(1000, 1010)}
    assert runner.stats.consumers["worker"].restarts == 1


async def test_autoscale_counts_the_lane(factory: Any, run_pipeline: Any) -> None:
    """Every event in the lane: only the lane's depth can scale the consumer up."""
    mod = factory.module("scaled_lane", HANDLERS)
    path = lane_pipeline(
        factory, mod, "when(id >= 0)", extra="autoscale: depth/20 max 4 every 50ms keep_alive 10s"
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    stats = runner.stats.consumers["worker"]
    assert stats.priority == 1010
    assert stats.max_consumers == 4


async def test_spans_say_the_lane(factory: Any, run_pipeline: Any, tmp_path: Path) -> None:
    from runner.traces_view import load_traces

    mod = factory.module("traced_lane", HANDLERS)
    traces = tmp_path / "traces.jsonl"
    code, _ = await run_pipeline(lane_pipeline(factory, mod, "when(kind == 'P')"), traces=f"file({traces})")
    assert code == 0
    lanes: dict[tuple[str, str], set[object]] = {}
    for spans in load_traces(traces).values():
        for span in spans:
            lanes.setdefault((span["name"], span["attributes"].get("edarun.lane")), set()).add(span["kind"])
    assert set(lanes) == {
        ("send work", "standard"),
        ("process work", "standard"),
        ("send work.priority", "priority"),
        ("process work.priority", "priority"),
    }


# -- the sequence and the guard, without a broker ---------------------------------------------------


class FakeDelivery:
    def __init__(self, queue: str, headers: dict[str, Any], broker: str = "memory") -> None:
        self.queue = queue
        self.headers = headers
        self.broker = broker


def stamped(sequencer: Sequencer, context: str, lane: str) -> FakeDelivery:
    headers: dict[str, Any] = {}
    sequencer.stamp(context, lane, headers)
    return FakeDelivery("q.priority" if lane == "priority" else "q", headers)


def test_sequencer_names_the_last_standard_event_of_the_context() -> None:
    seq = Sequencer("p1")
    first = stamped(seq, "A", "standard")
    stamped(seq, "B", "standard")
    second = stamped(seq, "A", "standard")
    cancel = stamped(seq, "A", "priority")
    fresh = stamped(seq, "C", "priority")
    after = stamped(seq, "A", "standard")
    assert first.headers == {SEQUENCE: "p1:1"}
    assert second.headers == {SEQUENCE: "p1:3"}
    assert cancel.headers == {SEQUENCE: "p1:0", AFTER: 3}  # waits for A's last standard event
    assert fresh.headers == {SEQUENCE: "p1:0"}  # C has none: it waits for nothing
    assert after.headers == {SEQUENCE: "p1:4"}  # standard events never wait


def test_a_forgotten_context_waits_for_the_floor() -> None:
    import runner.patterns.priority as priority

    seq = Sequencer("p1")
    old, priority.MAX_CONTEXTS = priority.MAX_CONTEXTS, 2
    try:
        for context in "ABC":
            stamped(seq, context, "standard")  # A (n=1) is forgotten when C arrives
        cancel = stamped(seq, "A", "priority")
        other = stamped(seq, "Z", "priority")
    finally:
        priority.MAX_CONTEXTS = old
    assert cancel.headers[AFTER] == 1 and other.headers[AFTER] == 1


def test_guard_holds_a_priority_event_until_its_predecessor_arrives() -> None:
    seq = Sequencer("p1")
    events = [stamped(seq, c, "standard") for c in ("A", "B", "C")]
    cancel_c = stamped(seq, "C", "priority")
    guard = OrderGuard("q", "q.priority")
    assert guard.admit(cancel_c, "cancel C", 0.0) == []  # C's place (n=3) has not arrived
    assert guard.admit(events[0], "A", 0.0) == ["A"]
    assert guard.admit(events[1], "B", 0.0) == ["B"]
    assert guard.admit(events[2], "C", 0.0) == ["C", "cancel C"]  # right after its place
    assert len(guard) == 0


def test_guard_never_holds_a_standard_event() -> None:
    seq = Sequencer("p1")
    place, cancel, later = (stamped(seq, "A", lane) for lane in ("standard", "priority", "standard"))
    guard = OrderGuard("q", "q.priority")
    assert guard.admit(later, "later", 0.0) == ["later"]  # even ahead of the cancel: the lane is read first
    assert guard.admit(cancel, "cancel", 0.0) == ["cancel"]  # n=2 ≥ 1 routed: its place came before
    assert place.headers == {SEQUENCE: "p1:1"}


def test_guard_releases_when_the_predecessor_was_processed_before_it_started() -> None:
    seq = Sequencer("p1")
    stamped(seq, "A", "standard")  # processed by an earlier run: never arrives here
    cancel = stamped(seq, "A", "priority")
    later = stamped(seq, "B", "standard")
    guard = OrderGuard("q", "q.priority")
    assert guard.admit(cancel, "cancel A", 0.0) == []
    assert guard.admit(later, "B", 0.0) == ["B", "cancel A"]  # a later standard event arrived

    guard = OrderGuard("q", "q.priority")
    seq = Sequencer("p2")
    stamped(seq, "A", "standard")
    cancel = stamped(seq, "A", "priority")
    assert guard.admit(cancel, "cancel A", 1.0) == []
    assert guard.waiting_on() == {"q"}
    assert guard.drained("q", before=0.5) == []  # held after the look began: not yet
    assert guard.drained("q", before=2.0) == ["cancel A"]  # the standard queue had nothing left


def test_guard_follows_each_broker_of_a_multi_broker_apart() -> None:
    """Pattern 9: a publisher's standard events are in order per broker only; with `spread:
    by_context`, a cancel and its place share a broker, and a later event of the same publisher
    on the other broker says nothing about the place."""
    seq = Sequencer("p1")
    place = stamped(seq, "A", "standard")
    place.broker = "amqp://b"
    other = stamped(seq, "B", "standard")  # on the other broker, published after the place
    cancel = stamped(seq, "A", "priority")
    cancel.broker = "amqp://b"
    guard = OrderGuard("q", "q.priority")
    assert guard.admit(other, "B", 0.0) == ["B"]
    assert guard.admit(cancel, "cancel A", 0.0) == []  # one broker ahead of the other: still waits
    assert guard.admit(place, "A", 0.0) == ["A", "cancel A"]


def test_guard_forgets_what_a_dead_channel_told_it() -> None:
    seq = Sequencer("p1")
    place = stamped(seq, "A", "standard")
    cancel_1, cancel_2 = stamped(seq, "A", "priority"), stamped(seq, "A", "priority")
    guard = OrderGuard("q", "q.priority")
    assert guard.admit(place, "place", 0.0) == ["place"]
    # The connection dies: the place was routed but not acknowledged; it comes again.
    cancel_1.stale = False  # type: ignore[attr-defined]
    guard.reconnected()
    assert guard.admit(cancel_1, "cancel 1", 0.0) == []  # no longer taken as arrived
    cancel_2.stale = True  # type: ignore[attr-defined]
    guard.waiting.setdefault("p1@memory", []).append((1, "cancel 2", cancel_2, 0.0))  # on the old channel
    guard.reconnected()
    assert [entry[1] for entry in guard.waiting["p1@memory"]] == ["cancel 1"]  # the stale one comes again
    assert guard.admit(place, "place", 0.0) == ["place", "cancel 1"]


async def test_a_busy_feed_lets_other_tasks_run() -> None:
    from runner.brokers import Message
    from runner.brokers.memory import MemoryBroker
    from runner.patterns.priority import PriorityFeed

    broker = MemoryBroker()
    for queue in ("q", "q.priority"):
        await broker.declare(queue)
    for n in range(2000):
        await broker.publish("q", Message(b"{}", f"s{n}"))
    feed = PriorityFeed(
        await broker.consume("q.priority", prefetch=5000), await broker.consume("q", prefetch=5000),
        owns_lane=True,
    )  # fmt: skip
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    for _ in range(2000):
        await (await feed.__anext__()).ack()
    task.cancel()
    assert ticks >= 2000 // 64 - 1
    await broker.close()


async def test_an_idle_ambulance_sleeps() -> None:
    """No busy-waiting: with both lanes empty a worker's feed waits without polling."""
    from runner.brokers.memory import MemoryBroker
    from runner.patterns.priority import PriorityFeed

    broker = MemoryBroker()
    await broker.declare("q")
    await broker.declare("q.priority")
    feed = PriorityFeed(
        await broker.consume("q.priority", prefetch=5), await broker.consume("q", prefetch=5), owns_lane=True
    )
    polls = {"lane": 0, "standard": 0}

    def counted(name: str, subscription: Any) -> None:
        original = subscription.poll

        def counting() -> Any:
            polls[name] += 1
            return original()

        subscription.poll = counting

    counted("lane", feed.lane)
    counted("standard", feed.standard)
    waiter = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.05)
    assert polls == {"lane": 1, "standard": 1} and not waiter.done()  # asked once each, then asleep
    from runner.brokers import Message

    await broker.publish("q", Message(b"{}", "s1"))
    assert (await asyncio.wait_for(waiter, 1)).message_id == "s1"  # woken by the standard queue
    assert polls == {"lane": 1, "standard": 2}  # the idle lane is not asked again
    await broker.publish("q", Message(b"{}", "s2"))
    await broker.publish("q.priority", Message(b"{}", "p2"))
    assert (await feed.__anext__()).message_id == "p2"  # it said it has one: the lane first
    assert (await feed.__anext__()).message_id == "s2"
    await feed.close()
    await broker.close()


def test_a_lane_has_its_queues_type(factory: Any) -> None:
    from runner.config.loader import load_pipeline
    from runner.runtime.app import queue_types, queues_of

    mod = factory.module("typed_lane", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: typed
        plugins: [plugins]
        queues:
          work: {{queue_type: quorum}}
        producers:
          feed: {{source: "{mod}:few", to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", priority_lane: true}}
        """
    )
    loaded = load_pipeline(path)
    assert queues_of(loaded) == ["work", "work.priority"]
    assert queue_types(loaded) == {"work": "quorum", "work.priority": "quorum"}


async def test_an_event_whose_context_is_not_a_value_still_goes(factory: Any, run_pipeline: Any) -> None:
    """A list or an object in the ordering field is no context (as the dispatcher sees it)."""
    mod = factory.module(
        "odd_context",
        HANDLERS
        + """

def odd():
    yield {"id": 1, "kind": "PLACE", "account": "A"}
    yield {"id": 2, "kind": "PLACE", "account": ["A", "B"]}
    yield {"id": 3, "kind": "CANCEL", "account": {"nested": 1}}
    yield {"id": 4, "kind": "CANCEL", "account": "A"}
""",
    )
    path = lane_pipeline(
        factory, mod, "when(kind == 'CANCEL')", source="odd", extra="ordering: by_context(account)"
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert sorted(e[0] for e in factory.imported(mod).LOG) == [1, 2, 3, 4]
    assert runner.stats.producers["feed"].published == 4
