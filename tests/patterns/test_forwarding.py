"""Event forwarding (pattern 1): when deliveries are acknowledged, and that nothing is lost."""

from __future__ import annotations

import importlib

import pytest

from runner.patterns.forwarding import forwarding
from runner.types import Envelope


class RecordingDelivery:
    def __init__(self, log: list[str]) -> None:
        self.body, self.message_id, self.headers = b"{}", "m1", {}
        self.redelivered, self.queue = False, "q"
        self.log = log

    async def ack(self) -> None:
        self.log.append("ack")

    async def nack(self, *, requeue: bool) -> None:
        self.log.append(f"nack requeue={requeue}")


async def handler_step(log: list[str], fail: bool = False):  # type: ignore[no-untyped-def]
    async def call_next(envelope: Envelope) -> None:
        log.append("handler")
        if fail:
            raise RuntimeError("boom")

    return call_next


async def test_at_least_once_acks_after_the_handler() -> None:
    log: list[str] = []
    envelope = Envelope(RecordingDelivery(log), worker=1, attempt=1)
    await forwarding("at_least_once")(envelope, await handler_step(log))
    assert log == ["handler", "ack"]


async def test_at_least_once_never_acks_a_failed_call() -> None:
    log: list[str] = []
    envelope = Envelope(RecordingDelivery(log), worker=1, attempt=1)
    with pytest.raises(RuntimeError):
        await forwarding("at_least_once")(envelope, await handler_step(log, fail=True))
    assert log == ["handler"]


async def test_at_most_once_acks_on_receipt() -> None:
    log: list[str] = []
    envelope = Envelope(RecordingDelivery(log), worker=1, attempt=1)
    await forwarding("at_most_once")(envelope, await handler_step(log))
    assert log == ["ack", "handler"]


async def test_a_settled_delivery_is_not_acked_twice() -> None:
    log: list[str] = []
    envelope = Envelope(RecordingDelivery(log), worker=1, attempt=1)

    async def parks(env: Envelope) -> None:
        env.settled = True  # a lower layer handed it on (parked, retry scheduled)

    await forwarding("at_least_once")(envelope, parks)
    assert log == []


async def test_worker_crash_redelivers_what_it_held(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    """A worker that dies mid-call loses nothing: its unacknowledged deliveries come back marked."""
    jsonl("events.jsonl", [{"n": i} for i in range(40)])
    mod = factory.module(
        "crashy",
        """
        DONE = []
        REDELIVERED = []

        def handle(event, ctx):
            if event["n"] in (5, 17, 33) and not ctx.redelivered:
                raise SystemExit("the consumer died")
            if ctx.redelivered:
                REDELIVERED.append(event["n"])
            DONE.append(event["n"])
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: crash
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", prefetch: 10}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    module = importlib.import_module(mod)
    assert set(module.DONE) == set(range(40))  # nothing lost
    assert {5, 17, 33} <= set(module.REDELIVERED)
    stats = runner.stats.consumers["worker"]
    assert stats.restarts == 3
    # Duplicates only within the in-flight window of the crashed worker (its prefetch).
    assert len(module.DONE) - 40 <= 3 * 10


async def test_a_crash_at_the_very_end_still_reaches_idle(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    """The last event kills its worker: the restarted worker takes it again and the run ends."""
    jsonl("events.jsonl", [{"n": i} for i in range(5)])
    mod = factory.module(
        "lastcrash",
        """
        DONE = []

        def handle(event, ctx):
            if event["n"] == 4 and not ctx.redelivered:
                raise SystemExit("died on the last event")
            DONE.append(event["n"])
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: lastcrash
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle"}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert sorted(importlib.import_module(mod).DONE) == [0, 1, 2, 3, 4]
    assert runner.stats.consumers["worker"].restarts == 1
