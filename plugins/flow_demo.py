"""The producer control flow pattern's trades (pattern 8): a source, a handler, and what they saw.

`trades` is the talk's `BUY AAPL <n> SHARES` feed, endless (`count` caps it; the producer's `rate:`
paces it). Sources are pulled lazily, so the source takes the time just before the producer
publishes each trade (before the delay flow control adds, if any): `sent_at` (wall clock, in the
event) and an entry in `journal.published` (monotonic clock). `place_trade` is a coroutine that
spends `WORK_MS` in an `await` (the call to the exchange), then notes when it finished in
`journal.finished`, and the trade's wait (handler start - `sent_at`) in `journal.waits`.

Published and finished times give the backlog at every moment (`max_depth`): trades taken by a
producer and not finished yet, whatever the broker says. `journal` lives in this module, so an
in-process run (examples/producer_control_flow/run.py) reads it afterwards; in a service process of
its own (on RabbitMQ) it stays there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

WORK_MS = 2.0  # placing a trade: the consumer's pace, ~450 a second with one worker
SYMBOLS = ("AAPL", "IBM", "GOOG", "MSFT", "ORCL")


@dataclass
class Journal:
    """When each trade was published and finished (monotonic seconds), and how long it waited."""

    published: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # handler start - sent_at, seconds
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.published, self.finished, self.waits = [], [], []

    def sent(self) -> None:
        with self.lock:
            self.published.append(time.monotonic())

    def done(self, wait: float) -> None:
        with self.lock:
            self.finished.append(time.monotonic())
            self.waits.append(wait)


journal = Journal()


def max_depth(published: list[float], finished: list[float]) -> int:
    """The deepest the backlog got, from publish and finish times alone (not the broker's count)."""
    depth = deepest = 0
    for _, change in sorted([(t, 1) for t in published] + [(t, -1) for t in finished]):
        depth += change
        deepest = max(deepest, depth)
    return deepest


def trades() -> Iterator[Event]:
    """`BUY <symbol> <n> SHARES`, endless: the producer's `count` caps it and its `rate` paces it."""
    number = 0
    while True:
        number += 1
        shares = 100 + number % 900
        symbol = SYMBOLS[number % len(SYMBOLS)]
        journal.sent()
        yield {
            "id": number,
            "trade": f"BUY {symbol} {shares} SHARES",
            "symbol": symbol,
            "shares": shares,
            "sent_at": time.time(),  # stamped as the producer takes it (sources are lazy)
        }


async def place_trade(trade: Event, ctx: Context) -> None:
    """Place one trade: WORK_MS at the exchange."""
    wait = max(0.0, time.time() - float(trade.get("sent_at", time.time())))
    await asyncio.sleep(WORK_MS / 1000)  # the call to the exchange
    journal.done(wait)
    ctx.log.debug(
        "placed %s (trade %s) after waiting %.0f ms", trade.get("trade"), trade.get("id"), wait * 1000
    )
