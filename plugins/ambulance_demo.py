"""The ambulance pattern's messages (pattern 3): sources, handlers, and what the handlers saw.

- `talk_messages`: the talk's demo, eight messages in the order `S1 S2 S3 P1 S4 S5 S6 P2`, one every
  500 ms, 2 s of work each, all scaled down by the `SCALE` environment variable (default 10: one
  every 50 ms, 200 ms of work). The source paces itself (sources are pulled lazily, so an async
  generator that sleeps sets the producer's pace) on a fixed schedule from the first message, and
  stamps each message as it hands it over: `sent_at` (wall clock) and `sent_ms`, milliseconds since
  the first message was sent: the talk's `T`. For examples/ambulance/.
- `trades`: the feed of pipelines/ambulance.yaml: a stream of PLACE orders over two hundred
  accounts, and every fortieth event a CANCEL: of one of the last thirty orders, perhaps still in the
  backlog, or of an older one. A cancel must not wait behind the orders placed meanwhile, and must
  not run before the order it cancels either.

Every event carries `seq`, its position in its feed (1, 2, …), and `work_ms`. The handlers are
coroutines that spend `work_ms` in an `await` (the call to the exchange; a sync handler would do as
well), and write to `journal` when each event started and finished, on which lane
(`ctx.lane`) and worker (`ctx.worker`), and how many events sent before it had not started yet: the
events it overtook. `journal` lives in this module, so an in-process run (examples/ambulance/run.py)
reads it afterwards; in a service process of its own (on RabbitMQ) it stays there.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

# The talk's demo, unscaled.
TALK_SEQUENCE = ("S1", "S2", "S3", "P1", "S4", "S5", "S6", "P2")
TALK_EVERY_MS = 500
TALK_WORK_MS = 2000
DEFAULT_SCALE = 10.0

# `trades`: the shipped pipeline's feed.
ACCOUNTS = ("B-123", "Q-665", "T-329", "D-945", "A-136", "V-976", "B-387", "C-210", "E-554", "F-081")
ACCOUNTS += tuple(f"A-{n}" for n in range(200, 390))  # two hundred accounts
SYMBOLS = ("AAPL", "IBM", "GOOG", "ATT", "XPH", "GLD", "FB", "AMZN", "MSFT", "ORCL")
CANCEL_EVERY = 40  # every fortieth event cancels an order: of the last RECENT, or an older one
RECENT = 30
PLACE_MS = 5  # placing an order: checks, then the exchange
CANCEL_MS = 1  # cancelling a resting order
SEED = 3


def scale() -> float:
    """The talk's times are divided by SCALE (default 10)."""
    text = os.environ.get("SCALE", "")
    try:
        value = float(text) if text else DEFAULT_SCALE
    except ValueError:
        raise ValueError(f"SCALE must be a number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"SCALE must be positive, got {text!r}")
    return value


async def talk_messages() -> AsyncIterator[Event]:
    """`S1 S2 S3 P1 S4 S5 S6 P2`, one every 500 ms / SCALE, each 2000 ms / SCALE of work."""
    factor = scale()
    loop = asyncio.get_running_loop()
    start = loop.time()
    first: float | None = None
    for seq, name in enumerate(TALK_SEQUENCE, start=1):
        delay = start + (seq - 1) * TALK_EVERY_MS / factor / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.time()
        first = now if first is None else first
        yield {
            "id": name,
            "seq": seq,
            "kind": "priority" if name.startswith("P") else "standard",
            "work_ms": TALK_WORK_MS / factor,
            "sent_at": now,  # stamped as the producer takes it (sources are lazy)
            "sent_ms": (now - first) * 1000,
        }


def trades() -> Iterator[Event]:
    """PLACE orders, and every fortieth event a CANCEL of a recent one; endless (`count` caps it)."""
    rng = random.Random(SEED)
    placed: list[Event] = []
    seq = 0
    while True:
        seq += 1
        event: Event
        if seq % CANCEL_EVERY == 0:
            # Half cancel a recent order, perhaps still in the backlog; half an older one, long done.
            recent = seq // CANCEL_EVERY % 2 == 1
            order = rng.choice(placed[-RECENT:] if recent else placed[: len(placed) // 3])
            event = {"id": seq, "seq": seq, "kind": "CANCEL", "cancels": order["id"], "work_ms": CANCEL_MS}
            event.update({k: order[k] for k in ("account", "side", "symbol", "shares")})
        else:
            event = {
                "id": seq,
                "seq": seq,
                "kind": "PLACE",
                "account": rng.choice(ACCOUNTS),
                "side": rng.choice(("BUY", "SELL")),
                "symbol": rng.choice(SYMBOLS),
                "shares": rng.randrange(1, 4000),
                "work_ms": PLACE_MS,
            }
            placed.append(event)
        event["sent_at"] = time.time()  # stamped as the producer takes it (sources are lazy)
        yield event


@dataclass
class Entry:
    """One event as a handler saw it."""

    id: Any
    seq: int
    kind: str
    lane: str  # ctx.lane: "priority" or "standard"
    worker: int  # ctx.worker
    sent_at: float  # wall clock, stamped by the source
    started: float  # wall clock
    position: int  # started 1st, 2nd, … in this process
    overtook: int  # events sent before it that had not started yet
    finished: float | None = None

    @property
    def waited_ms(self) -> float:
        return max(0.0, self.started - self.sent_at) * 1000


@dataclass
class Journal:
    """Every event the handlers started, in the order they started it, from every worker."""

    entries: list[Entry] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.entries = []

    def start(self, event: Event, ctx: Context) -> Entry:
        started = time.time()
        seq = int(event.get("seq", 0))
        with self.lock:
            earlier = sum(1 for e in self.entries if e.seq < seq)
            entry = Entry(
                id=event.get("id"), seq=seq, kind=str(event.get("kind")), lane=ctx.lane, worker=ctx.worker,
                sent_at=float(event.get("sent_at", started)), started=started,
                position=len(self.entries) + 1, overtook=max(0, seq - 1 - earlier),
            )  # fmt: skip
            self.entries.append(entry)
        return entry

    def finish(self, entry: Entry) -> None:
        with self.lock:
            entry.finished = time.time()

    def find(self, event_id: Any) -> Entry | None:
        with self.lock:
            return next((e for e in reversed(self.entries) if e.id == event_id), None)


journal = Journal()


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


async def process_message(message: Event, ctx: Context) -> None:
    """The talk's demo: do the message's work, saying when it started (T: ms since S1 was sent)."""
    entry = journal.start(message, ctx)
    sent_ms = float(message.get("sent_ms", 0.0))
    started_ms = sent_ms + entry.waited_ms
    ahead = f", ahead of {entry.overtook} sent before it" if entry.overtook else ""
    ctx.log.info(
        "%s processed %s at T=%.0f ms (sent at T=%.0f ms; %s lane, worker %d)%s",
        entry.id, ordinal(entry.position), started_ms, sent_ms, entry.lane, entry.worker, ahead,
    )  # fmt: skip
    await asyncio.sleep(float(message.get("work_ms", 0)) / 1000)  # the message's work
    journal.finish(entry)


async def execute_trade(trade: Event, ctx: Context) -> None:
    """Place an order, or cancel one placed before; a cancel says how long it waited, how many
    orders it overtook, and whether the order it cancels had been placed (it always has, with
    `ordering: by_context(account)`; without it a cancel may find nothing to cancel)."""
    entry = journal.start(trade, ctx)
    await asyncio.sleep(float(trade.get("work_ms", PLACE_MS)) / 1000)  # the call to the exchange
    journal.finish(entry)
    if trade.get("kind") != "CANCEL":
        ctx.log.debug(
            "worker %d: placed %s %s,%s,%s,%s after waiting %.0f ms",
            entry.worker, trade.get("id"), trade.get("account"), trade.get("side"), trade.get("symbol"),
            trade.get("shares"), entry.waited_ms,
        )  # fmt: skip
        return
    order = journal.find(trade.get("cancels"))
    if order is None or order.finished is None or order.finished > entry.started:
        ctx.log.warning("order violation: CANCEL %s ran before order %s was placed", trade.get("id"),
                        trade.get("cancels"))  # fmt: skip
        return
    ctx.log.info(
        "CANCEL %s of order %s (%s %s %s): %s lane, worker %d, waited %.0f ms, ahead of %d order%s "
        "sent before it; its order was placed %.0f ms before",
        trade.get("id"), trade.get("cancels"), trade.get("account"), trade.get("side"), trade.get("symbol"),
        entry.lane, entry.worker, entry.waited_ms, entry.overtook, "" if entry.overtook == 1 else "s",
        (entry.started - order.finished) * 1000,
    )  # fmt: skip
