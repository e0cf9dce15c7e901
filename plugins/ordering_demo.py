"""The thread delegate pattern's trades (pattern 2): a source, a handler, and what the handler saw.

`trades` is a `module:function` source: the talk's ten demo trades first (B-123, Q-665, T-329 and
D-945, each with its own sequence numbers), then generated trades over twenty brokerage accounts,
each account numbering its trades 1, 2, 3, … in publish order (`seq`). Every eighth trade of an
account cancels the one before it (`kind: CANCEL`, `cancels: <seq>`), as in the talk's
`CANCEL BUY AAPL A-136`: placed before its order, a cancel finds nothing to cancel.

`place_trade` is a plain function (edarun runs it in a worker thread, like the talk's threads): it
sleeps a few milliseconds (the simulated call to the exchange) and writes the trade to `journal`,
which checks each account's order: a trade placed after a later trade of its account is an order
violation (logged as a warning), and so is an account on two workers at once. `journal` lives in
this module, so an in-process run (examples/thread_delegate/run.py) reads it afterwards.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# The talk's demo (`sending: (seq) ACCOUNT,SIDE,SYMBOL,N SHARES`): the ten trades of trading.py.
from trading import TALK_TRADES

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]


# Twenty accounts; the talk's four trade three times as often as the others.
ACCOUNTS = (
    "B-123", "Q-665", "T-329", "D-945", "A-136", "V-976", "B-387", "C-210", "E-554", "F-081",
    "G-732", "H-419", "J-603", "K-275", "L-948", "M-362", "N-117", "P-580", "R-824", "S-049",
)  # fmt: skip
WEIGHTS = tuple(3 if account in ("B-123", "Q-665", "T-329", "D-945") else 1 for account in ACCOUNTS)
SYMBOLS = ("AAPL", "IBM", "GOOG", "ATT", "XPH", "GLD", "FB", "AMZN", "MSFT", "ORCL")
CANCEL_EVERY = 8  # an account's 8th, 16th, … trade cancels the one before it
SEED = 2


def trades() -> Iterator[Event]:
    """The talk's ten trades, then generated ones, endless (the producer's `count` caps it)."""
    rng = random.Random(SEED)
    seqs: Counter[str] = Counter()
    last: dict[str, Event] = {}
    number = 0

    def trade(account: str, side: str, symbol: str, shares: int) -> Event:
        nonlocal number
        number += 1
        seqs[account] += 1
        event: Event = {
            "id": number, "account": account, "seq": seqs[account], "kind": "PLACE",
            "side": side, "symbol": symbol, "shares": shares,
        }  # fmt: skip
        previous = last.get(account)
        if seqs[account] % CANCEL_EVERY == 0 and previous is not None and previous["kind"] == "PLACE":
            event.update(kind="CANCEL", cancels=previous["seq"], side=previous["side"],
                         symbol=previous["symbol"], shares=previous["shares"])  # fmt: skip
        last[account] = event
        return event

    for account, side, symbol, shares in TALK_TRADES:
        yield trade(account, side, symbol, shares)
    while True:
        account = rng.choices(ACCOUNTS, WEIGHTS)[0]
        yield trade(account, rng.choice(("BUY", "SELL")), rng.choice(SYMBOLS), rng.randrange(1, 4000))


def work_seconds(trade: Event) -> float:
    """2 to 6 ms at the exchange, fixed per trade, so the workers drift out of step."""
    return 0.002 + (int(trade.get("id", 0)) * 7 % 5) / 1000


@dataclass
class Violation:
    account: str
    seq: int  # placed …
    after: int  # … after this later trade of its account had been placed


@dataclass
class Journal:
    """What the handler saw, for all its worker threads at once (hence the lock)."""

    placed: dict[str, list[int]] = field(default_factory=dict)  # account → seqs in the order placed
    open_orders: dict[str, set[int]] = field(default_factory=dict)  # account → placed, not cancelled
    running: dict[str, int] = field(default_factory=dict)  # account → the worker placing it now
    violations: list[Violation] = field(default_factory=list)
    overlaps: int = 0  # a trade started while another of its account ran on another worker
    cancel_misses: int = 0  # a cancel that found no order to cancel (it came before its order)
    repeats: int = 0  # a redelivery of a trade already placed (at-least-once)
    workers: dict[str, set[int]] = field(default_factory=dict)  # account → workers that placed it
    first_started: float | None = None  # time.monotonic() when the first trade started
    last_placed: float | None = None  # … and when the last one was placed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.placed, self.open_orders, self.running = {}, {}, {}
            self.violations, self.workers = [], {}
            self.overlaps = self.cancel_misses = self.repeats = 0
            self.first_started = self.last_placed = None

    def begin(self, account: str, worker: int) -> bool:
        """A trade of `account` starts on `worker`; True when another worker is placing one now."""
        with self.lock:
            if self.first_started is None:
                self.first_started = time.monotonic()
            other = self.running.get(account)
            self.running[account] = worker
            if other is not None and other != worker:
                self.overlaps += 1
                return True
            return False

    def end(self, account: str, worker: int) -> None:
        with self.lock:
            if self.running.get(account) == worker:
                del self.running[account]

    def place(self, trade: Event, worker: int, redelivered: bool) -> Violation | None:
        account, seq = str(trade["account"]), int(trade["seq"])
        with self.lock:
            self.last_placed = time.monotonic()
            seen = self.placed.setdefault(account, [])
            if redelivered and seq in seen:
                self.repeats += 1
                return None
            self.workers.setdefault(account, set()).add(worker)
            orders = self.open_orders.setdefault(account, set())
            if trade.get("kind") == "CANCEL":
                if trade.get("cancels") in orders:
                    orders.discard(trade["cancels"])
                else:
                    self.cancel_misses += 1
            else:
                orders.add(seq)
            latest = max(seen, default=0)
            seen.append(seq)
            if seq < latest:
                violation = Violation(account, seq, latest)
                self.violations.append(violation)
                return violation
            return None

    @property
    def trades(self) -> int:
        return sum(len(seqs) for seqs in self.placed.values())


journal = Journal()


def place_trade(trade: Event, ctx: Context) -> None:
    """Place one trade at the (simulated) exchange and check its account's order.

    The talk's output, `Thread <id>: Placed (seq) ACCOUNT,SIDE,SYMBOL,N`, is a debug log line
    (`edarun up -v`); an order violation is a warning.
    """
    account = str(trade["account"])
    journal.begin(account, ctx.worker)
    try:
        time.sleep(work_seconds(trade))  # the call to the exchange
        violation = journal.place(trade, ctx.worker, ctx.redelivered)
    finally:
        journal.end(account, ctx.worker)
    if violation is not None:
        ctx.log.warning(
            "order violation: %s (%d) placed after (%d)", violation.account, violation.seq, violation.after
        )
    ctx.log.debug(
        "Thread %d: %s (%d) %s,%s,%s,%s", ctx.worker, "Placed" if trade["kind"] == "PLACE" else "Cancelled",
        trade["seq"], account, trade["side"], trade["symbol"], trade["shares"],
    )  # fmt: skip
