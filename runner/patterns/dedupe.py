"""Idempotent consumer (part of pattern 1): `dedupe: by(field)` skips an event already processed.

At-least-once delivery means a redelivery after a crash, or a publish sent again after a lost
confirm, can bring the same event twice. The seen-set remembers the ids of events whose handler
returned, bounded in size and in time; a duplicate is acknowledged without calling the handler.
It lives in the consumer's process: a duplicate that arrives after that process restarted is
processed again (make the handler's effect idempotent when that matters).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from ..config.models import Dedupe
from ..types import CallNext, Envelope, Layer, lookup

MESSAGE_ID = "message_id"


class SeenSet:
    """Ids with an expiry, oldest first; at most `size` of them."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._expiry: OrderedDict[Any, float] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._expiry[key]
            return False
        return True

    def add(self, key: Any) -> None:
        now = time.monotonic()
        self._expiry[key] = now + self.ttl
        self._expiry.move_to_end(key)
        while self._expiry and (len(self._expiry) > self.size or next(iter(self._expiry.values())) < now):
            self._expiry.popitem(last=False)


def dedupe(policy: Dedupe, stats: Any, tracing: Any) -> Layer:
    seen = SeenSet(policy.size, policy.ttl)
    # Ids being processed right now: a second copy waits for the first instead of running beside it.
    in_progress: dict[Any, asyncio.Future[None]] = {}

    def key_of(envelope: Envelope) -> Any:
        if policy.by == MESSAGE_ID:
            return envelope.delivery.message_id
        value = lookup(envelope.event or {}, policy.by)
        return value if isinstance(value, str | int | float | bool) else None

    async def skip_duplicates(envelope: Envelope, call_next: CallNext) -> None:
        key = key_of(envelope)
        if key is None:  # nothing to recognise it by: process it
            await call_next(envelope)
            return
        while (running := in_progress.get(key)) is not None:
            await asyncio.shield(running)
        if key in seen:
            stats.duplicates += 1
            if envelope.span is not None:
                envelope.span.set_attribute("edarun.duplicate", True)
            return  # the forwarding layer acknowledges it
        done = in_progress[key] = asyncio.get_running_loop().create_future()
        try:
            await call_next(envelope)
            if not envelope.failed:
                seen.add(key)
        finally:
            del in_progress[key]
            done.set_result(None)

    return skip_duplicates
