"""Idempotent consumer: `dedupe: by(field)` runs the handler once per id, on both brokers."""

from __future__ import annotations

import importlib
import time

from runner.config.models import Dedupe
from runner.patterns.dedupe import SeenSet, dedupe
from runner.runtime.stats import ConsumerStats
from runner.types import Envelope


async def test_duplicates_by_field_are_acknowledged_without_the_handler(factory, jsonl, run_pipeline) -> None:  # type: ignore[no-untyped-def]
    events = [{"id": i % 10, "copy": i // 10} for i in range(30)]  # every id three times
    jsonl("events.jsonl", events)
    mod = factory.module(
        "once",
        """
        CALLS = []
        FAILED = set()

        def handle(event, ctx):
            if event["id"] == 3 and 3 not in FAILED:
                FAILED.add(3)
                raise RuntimeError("first try of 3 fails")
            CALLS.append(event["id"])
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: dedupe
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:handle"
            concurrency: 3
            dedupe: by(id)
            on_error: {{action: retry, retries: 2, backoff: 1ms}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    calls = importlib.import_module(mod).CALLS
    assert sorted(calls) == list(range(10))  # each id handled exactly once, 3 included
    stats = runner.stats.consumers["worker"]
    assert stats.processed == 10 and stats.failed == 1
    assert stats.duplicates == 20


class FakeDelivery:
    def __init__(self, message_id: str) -> None:
        self.body, self.message_id, self.headers = b"{}", message_id, {}
        self.redelivered, self.queue = True, "q"

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool) -> None: ...


async def test_dedupe_by_message_id() -> None:
    stats = ConsumerStats()
    layer = dedupe(Dedupe.model_validate("by(message_id)"), stats, None)
    calls: list[str] = []

    async def handler(envelope: Envelope) -> None:
        calls.append(envelope.delivery.message_id)

    for message_id in ["a", "b", "a", "a", "c", "b"]:
        envelope = Envelope(FakeDelivery(message_id), worker=1, attempt=1)
        envelope.event = {}
        await layer(envelope, handler)
    assert calls == ["a", "b", "c"]
    assert stats.duplicates == 3


def test_seen_set_forgets_by_age_and_size() -> None:
    seen = SeenSet(size=3, ttl=0.05)
    for key in "abcd":
        seen.add(key)
    assert "a" not in seen and all(k in seen for k in "bcd")
    time.sleep(0.06)
    assert "b" not in seen
    seen.add("e")
    assert "e" in seen
