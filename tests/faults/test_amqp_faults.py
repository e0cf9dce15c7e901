"""Faults on RabbitMQ, injected into a real `edarun up` (SPEC §1 pattern 1, §4, §5).

Each test runs the CLI as a user does — `edarun up PIPELINE --broker amqp://… --until-idle --report
FILE`, one OS process per service — and breaks something mid-run: `kill -9` of a consumer process,
a broker restart, every connection closed, SIGTERM to `up`, bodies that do not decode and handlers
that always raise. The handler appends one line per call to a file, so the test counts what was
processed, what was processed twice and what was redelivered, independently of edarun's own counters.
The producer is paced (`rate:`) so that the run lasts long enough to break it in the middle.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
from conftest import AMQP_URL

from runner.brokers.amqp import AmqpBroker

from .conftest import Scenario, failing, read_report, wait_for_broker

EVENTS = 20_000
RATE = 3000  # events/s: about 7 s of publishing, time to break things in the middle
PREFETCH = 100
CONCURRENCY = 2


def broker_fault_window() -> int:
    """What may be in flight when the broker goes away: the consumer's unacknowledged deliveries
    and the producer's unconfirmed publishes."""
    return PREFETCH * CONCURRENCY + AmqpBroker.publish_window


def kill_consumer(scenario: Scenario, *, killed: set[int]) -> int:
    """`kill -9` the consumer's (current) process; returns its pid."""
    pid = scenario.wait_pids(scenario.consumer, other_than=killed)[0]
    os.kill(pid, signal.SIGKILL)
    killed.add(pid)
    return pid


def test_kill_9_of_the_consumer_twice_loses_nothing(scenario: Scenario, tmp_path: Path) -> None:
    scenario.write(events=EVENTS, rate=RATE, consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY})
    report = tmp_path / "report.json"
    up = scenario.up(report)
    killed: set[int] = set()
    scenario.wait_calls(EVENTS // 5, up)
    kill_consumer(scenario, killed=killed)
    scenario.wait_pids(scenario.consumer, other_than=killed)  # the supervisor restarted it
    scenario.wait_calls(scenario.lines() + EVENTS // 5, up)
    kill_consumer(scenario, killed=killed)
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)

    calls = scenario.calls()
    assert calls.ids == set(range(EVENTS)), f"{EVENTS - len(calls.ids)} events never processed"
    # At most the in-flight window of the killed process, per kill, is delivered again.
    assert calls.duplicates <= 2 * PREFETCH * CONCURRENCY, calls.duplicates
    assert calls.repeats_unmarked() == [], "a redelivery was not marked as redelivered"
    data = read_report(report)
    sink = data["consumers"][scenario.consumer]
    assert sink["restarts"] >= 2, sink
    assert data["outcome"] == "idle"
    assert data["producers"][scenario.producer] == {"published": EVENTS, "rejected": 0}


def test_kill_9_with_a_priority_lane_loses_nothing(scenario: Scenario, tmp_path: Path) -> None:
    """Ambulance workers share one lane subscription: a killed process gives back both lanes."""
    consumer = {"prefetch": PREFETCH, "concurrency": CONCURRENCY, "priority_lane": "when(id % 10 == 0)"}
    scenario.write(events=EVENTS, rate=RATE, consumer=consumer)
    report = tmp_path / "report.json"
    up = scenario.up(report)
    killed: set[int] = set()
    scenario.wait_calls(EVENTS // 3, up)
    kill_consumer(scenario, killed=killed)
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(EVENTS)), f"{EVENTS - len(calls.ids)} events never processed"
    assert calls.duplicates <= 2 * PREFETCH * CONCURRENCY, calls.duplicates
    lanes = read_report(report)["consumers"][scenario.consumer]["lanes"]
    # Duplicates aside (a killed process's window is delivered again), a tenth came by the lane.
    assert EVENTS // 10 <= lanes["priority"] <= EVENTS // 10 + calls.duplicates, lanes


FLOW_HANDLERS = """
import asyncio


def feed():
    for i in range(4000):
        yield {"id": i}


async def work(event, ctx):
    await asyncio.sleep(0.002)
"""


def test_a_killed_flow_monitor_comes_back_and_resumes(scenario: Scenario, tmp_path: Path) -> None:
    """Pattern 8: `kill -9` of the flow monitor while it has the producer slowed; the supervisor
    starts it again, it re-announces the state it finds, and the producer is not left slowed."""
    module = scenario.factory.module("flow_fault", FLOW_HANDLERS)
    queue, producer, consumer = scenario.queue, scenario.producer, scenario.consumer
    scenario.path = scenario.factory.pipeline(
        f"""
        version: 1
        name: {scenario.tag}
        plugins: [plugins]
        queues:
          {queue}: {{flow_control: upper 200 lower 100 delay 20ms every 100ms}}
        producers:
          {producer}: {{source: "{module}:feed", to: {queue}, rate: 2000/s}}
        consumers:
          {consumer}: {{from: {queue}, handler: "{module}:work"}}
        """
    )
    report = tmp_path / "report.json"
    began = time.time()  # the report's at_s count from (a little after) here
    up = scenario.up(report)
    output = report.with_suffix(".err")
    deadline = time.monotonic() + 30
    while "flow=slow" not in output.read_text(errors="replace"):
        assert up.poll() is None and time.monotonic() < deadline, scenario.stderr(report)
        time.sleep(0.05)
    monitor = f"{queue}.flow"
    killed = scenario.wait_pids(monitor)[0]
    os.kill(killed, signal.SIGKILL)
    killed_at = time.time()
    scenario.wait_pids(monitor, other_than={killed})  # the supervisor started it again
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)
    data = read_report(report)
    assert data["consumers"][consumer]["processed"] == 4000
    assert data["producers"][producer]["published"] == 4000 and data["producers"][producer]["delayed"] > 0
    # The restarted monitor said the state it found (a restart's first word counts as a change),
    # and the producer was not left slowed: 4,000 events at one per 20 ms would take 80 s.
    after = [c for c in data["flow"] if c["at_s"] > killed_at - began]
    assert after, (killed_at - began, data["flow"])
    assert data["elapsed_s"] < 40, data["elapsed_s"]
    assert "died (signal 9)" in output.read_text(errors="replace")


def test_report_counts_the_calls_of_a_killed_process(scenario: Scenario, tmp_path: Path) -> None:
    events = 6000
    scenario.write(events=events, rate=RATE, consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY})
    report = tmp_path / "report.json"
    up = scenario.up(report)
    scenario.wait_calls(events // 3, up)
    kill_consumer(scenario, killed=set())
    assert scenario.finish(up, report) == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(events))
    processed = read_report(report)["consumers"][scenario.consumer]["processed"]
    # Every event's handler returned at least once, and no call is counted that was not made.
    assert events <= processed <= len(calls.lines), (processed, len(calls.lines))


def test_broker_restart_loses_no_confirmed_event(
    scenario: Scenario, tmp_path: Path, broker_control: Callable[..., None]
) -> None:
    scenario.write(events=EVENTS, rate=RATE, consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY})
    report = tmp_path / "report.json"
    up = scenario.up(report)
    scenario.wait_calls(EVENTS // 5, up)
    try:
        broker_control("stop_app")
        time.sleep(2)
    finally:
        broker_control("start_app")
        wait_for_broker()
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(EVENTS)), f"{EVENTS - len(calls.ids)} events never processed"
    # Duplicates are allowed (unacknowledged deliveries come again, unconfirmed publishes are
    # sent again), but no more than what was in flight when the broker went away.
    assert calls.duplicates <= broker_fault_window(), calls.duplicates
    data = read_report(report)
    assert data["outcome"] == "idle"
    assert data["producers"][scenario.producer] == {"published": EVENTS, "rejected": 0}


def test_all_connections_closed_producer_and_consumer_recover(
    scenario: Scenario, tmp_path: Path, broker_control: Callable[..., None]
) -> None:
    scenario.write(events=EVENTS, rate=RATE, consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY})
    report = tmp_path / "report.json"
    up = scenario.up(report)
    for share in (EVENTS // 5, EVENTS // 2):
        scenario.wait_calls(share, up)
        broker_control("close_all_connections", "--global", "fault test")
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(EVENTS)), f"{EVENTS - len(calls.ids)} events never processed"
    # Duplicates are allowed (unacknowledged deliveries come again, unconfirmed publishes are
    # sent again), but no more than what was in flight each time the connections were closed.
    assert calls.duplicates <= 2 * broker_fault_window(), calls.duplicates
    data = read_report(report)
    assert data["outcome"] == "idle"
    assert data["producers"][scenario.producer] == {"published": EVENTS, "rejected": 0}
    # The fault really happened: the services lost their connections and came back.
    log = report.with_suffix(".err").read_text(errors="replace")
    assert "lost" in log and "reconnected to" in log, scenario.stderr(report)


def test_connections_closed_under_ordered_lanes_keep_each_cancel_after_its_place(
    scenario: Scenario, tmp_path: Path, broker_control: Callable[..., None]
) -> None:
    """Ordering across the two lanes holds through reconnects: what the dispatcher knew about the
    deliveries of a dead channel is forgotten, and they come again."""
    consumer = {
        "prefetch": PREFETCH,
        "concurrency": CONCURRENCY,
        "ordering": "by_context(account)",
        "priority_lane": "when(kind == 'CANCEL')",
    }
    scenario.write(events=EVENTS, rate=RATE, consumer=consumer)
    cancels: dict[int, int] = {}  # CANCEL id → the PLACE id it must follow
    lines = []
    for i in range(EVENTS):
        if i % 10 == 9 and i >= 100:
            place = i - 50 - i % 7  # a recent PLACE: likely still in the standard backlog
            cancels[i] = place - 1 if place % 10 == 9 else place
            account = f"A-{cancels[i] % 1000}"
            lines.append(json.dumps({"id": i, "kind": "CANCEL", "account": account}))
        else:
            lines.append(json.dumps({"id": i, "kind": "PLACE", "account": f"A-{i % 1000}"}))
    scenario.factory.data("events.jsonl", "\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    up = scenario.up(report)
    for share in (EVENTS // 5, EVENTS // 2):
        scenario.wait_calls(share, up)
        broker_control("close_all_connections", "--global", "fault test")
    code = scenario.finish(up, report)
    assert code == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(EVENTS)), f"{EVENTS - len(calls.ids)} events never processed"
    first: dict[int, int] = {}
    for index, (event_id, _) in enumerate(calls.lines):
        first.setdefault(event_id, index)
    early = [c for c, place in cancels.items() if first[c] < first[place]]
    assert not early, f"cancels handled before their order: {early[:10]}"
    lanes = read_report(report)["consumers"][scenario.consumer]["lanes"]
    assert lanes["priority"] >= len(cancels), lanes


def test_idle_after_a_reconnect_late_in_the_run(
    scenario: Scenario, tmp_path: Path, broker_control: Callable[..., None]
) -> None:
    """The last deliveries of a dead channel go back to the broker, which may give them all to one
    of the consumer's subscriptions: the others must not count them as held for ever."""
    events = 40
    scenario.write(events=events, rate=None, consumer={"prefetch": 10, "concurrency": 4}, sleep=0.25)
    report = tmp_path / "report.json"
    up = scenario.up(report)
    scenario.wait_calls(events // 3, up)
    broker_control("close_all_connections", "--global", "fault test")
    code = scenario.finish(up, report)  # fails the test if `up` does not end
    assert code == 0, scenario.stderr(report)
    assert scenario.calls().ids == set(range(events))
    assert read_report(report)["outcome"] == "idle"


def test_sigterm_drains_and_a_second_run_finishes_without_duplicates(
    scenario: Scenario, tmp_path: Path
) -> None:
    scenario.write(events=EVENTS, rate=RATE, consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY})
    first_report = tmp_path / "first.json"
    up = scenario.up(first_report)
    scenario.wait_calls(EVENTS // 4, up)
    up.send_signal(signal.SIGTERM)
    assert scenario.finish(up, first_report) == 130, scenario.stderr(first_report)
    first = read_report(first_report)
    assert first["outcome"] == "interrupted"
    published = first["producers"][scenario.producer]["published"]
    assert 0 < published < EVENTS, published
    first_calls = scenario.calls()
    # A drained service reports every call it made.
    assert first["consumers"][scenario.consumer]["processed"] == len(first_calls.lines)

    second_report = tmp_path / "second.json"
    rest = scenario.up(second_report, "--only", scenario.consumer)
    assert scenario.finish(rest, second_report) == 0, scenario.stderr(second_report)
    second = read_report(second_report)
    assert second["outcome"] == "idle"
    calls = scenario.calls()
    assert calls.ids == set(range(published)), "not every confirmed event was processed"
    repeated = sorted(i for i, n in calls.counts.items() if n > 1)
    assert repeated == [], f"{len(repeated)} events processed twice across a graceful stop"
    assert second["consumers"][scenario.consumer]["processed"] == len(calls.lines) - len(first_calls.lines)


RAW_BODIES = [b"not json {", b"\xff\xfe\x00", b"[1, 2, 3]", b"42", b""]


async def publish_raw(queue: str, bodies: list[bytes]) -> None:
    """Put bodies that are no JSON object straight on the queue, as an outside system might."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for n, body in enumerate(bodies):
            message = aio_pika.Message(
                body, message_id=f"raw-{n}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await channel.default_exchange.publish(message, routing_key=queue)


async def read_dashboard(queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message parked in a dashboard queue (taken off it: the test deletes it anyway)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        dashboard = await channel.declare_queue(queue, passive=True)
        parked = []
        while (message := await dashboard.get(no_ack=True, fail=False)) is not None:
            parked.append(message)
        return parked


def test_undecodable_and_failing_events_are_parked_not_looped(scenario: Scenario, tmp_path: Path) -> None:
    events, fail_every, retries = 2000, 200, 2
    scenario.write(
        events=events,
        rate=None,
        fail_every=fail_every,
        consumer={
            "prefetch": PREFETCH,
            "concurrency": CONCURRENCY,
            "on_error": {"action": "retry", "retries": retries, "backoff": "10ms"},
        },
    )
    asyncio.run(publish_raw(scenario.queue, RAW_BODIES))
    report = tmp_path / "report.json"
    up = scenario.up(report)
    assert scenario.finish(up, report) == 0, scenario.stderr(report)

    bad = failing(fail_every, events)
    calls = scenario.calls()
    assert calls.ids == set(range(events)), "a good event was not processed"
    for ident, count in calls.counts.items():
        expected = retries + 1 if ident in bad else 1
        assert count == expected, f"event {ident} was handled {count} times, expected {expected}"

    parked = asyncio.run(read_dashboard(f"{scenario.consumer}.dashboard"))
    assert len(parked) == len(RAW_BODIES) + len(bad)
    raw = {m.message_id or "": m for m in parked if (m.message_id or "").startswith("raw-")}
    assert sorted(raw) == [f"raw-{n}" for n in range(len(RAW_BODIES))]
    for n, body in enumerate(RAW_BODIES):
        message = raw[f"raw-{n}"]
        assert message.body == body  # parked as it came
        assert "undecodable" in str(message.headers["x-edarun-error"])
    refused = [m for m in parked if m.message_id not in raw]
    assert sorted(json.loads(m.body)["id"] for m in refused) == sorted(bad)
    for message in refused:
        ident = json.loads(message.body)["id"]
        error = str(message.headers["x-edarun-error"])
        assert "RuntimeError" in error and f"refusing event {ident}" in error, error
        assert message.headers["x-edarun-attempts"] == retries + 1

    data = read_report(report)
    sink = data["consumers"][scenario.consumer]
    assert sink["parked"] == len(parked)
    assert sink["processed"] == events - len(bad)
    assert sink["retried"] == retries * len(bad)
    assert sink["restarts"] == 0, "a bad event crashed the service"
    assert data["outcome"] == "idle"


def test_at_most_once_loses_what_a_killed_process_had_in_progress(scenario: Scenario, tmp_path: Path) -> None:
    # Slow calls, many at once: each kill catches several deliveries acknowledged and unfinished.
    events, concurrency, kills = 3000, 8, 3
    scenario.write(
        events=events,
        rate=1000,
        sleep=0.02,
        consumer={"prefetch": 200, "concurrency": concurrency, "delivery": "at_most_once"},
    )
    report = tmp_path / "report.json"
    up = scenario.up(report)
    killed: set[int] = set()
    for _ in range(kills):
        scenario.wait_calls(scenario.lines() + 300, up)
        kill_consumer(scenario, killed=killed)
    assert scenario.finish(up, report) == 0, scenario.stderr(report)
    calls = scenario.calls()
    lost = events - len(calls.ids)
    assert lost >= 1, "at_most_once lost nothing: the test cannot see the difference"
    # Acknowledged when its call starts, so only calls in progress are lost, and none is repeated.
    assert lost <= kills * concurrency, lost
    assert calls.duplicates == 0
    data = read_report(report)
    assert data["outcome"] == "idle"
    assert data["consumers"][scenario.consumer]["restarts"] >= kills


def test_two_instances_run_as_two_processes_and_share_the_queue(scenario: Scenario, tmp_path: Path) -> None:
    events = 10_000
    scenario.write(
        events=events,
        rate=RATE,
        consumer={"prefetch": PREFETCH, "concurrency": CONCURRENCY, "instances": 2},
    )
    report = tmp_path / "report.json"
    up = scenario.up(report)
    scenario.wait_calls(events // 5, up)
    assert len(scenario.wait_pids(scenario.consumer, count=2)) == 2
    assert up.poll() is None, "the run ended before both instances were seen"
    assert scenario.finish(up, report) == 0, scenario.stderr(report)
    calls = scenario.calls()
    assert calls.ids == set(range(events))
    assert calls.duplicates == 0
    data = read_report(report)
    sink = data["consumers"][scenario.consumer]
    assert sink["processed"] == events
    assert sink["max_consumers"] == 2 * CONCURRENCY
    assert data["outcome"] == "idle"
