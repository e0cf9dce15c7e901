"""The multi-broker pattern's trades (pattern 9): which broker each trade came through.

The trades are the thread delegate's (ordering_demo.trades: twenty brokerage accounts, each
numbering its trades 1, 2, 3, … in publish order); `place_trade` places them as that demo does,
checking each account's order, and notes the broker each one was consumed from (`ctx.broker`), so
the run shows the spread: trades per broker, and, with `spread: by_context(account)`, every account
on one broker. It returns a confirmation, which `settle` counts per broker too. What they saw is in
`brokers`, for an in-process run to read afterwards.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ordering_demo
from ordering_demo import trades

if TYPE_CHECKING:
    from runner.runtime.context import Context

__all__ = ["brokers", "place_trade", "settle", "trades"]

Event = dict[str, Any]


@dataclass
class Brokers:
    """Per broker: trades placed, confirmations settled, and the accounts seen (worker threads
    write at once, hence the lock)."""

    placed: Counter[str] = field(default_factory=Counter)
    settled: Counter[str] = field(default_factory=Counter)
    accounts: dict[str, set[str]] = field(default_factory=dict)  # account → brokers it came through
    lock: threading.Lock = field(default_factory=threading.Lock)

    def split_accounts(self) -> int:
        """Accounts whose trades came through more than one broker (0 with by_context)."""
        return sum(1 for seen in self.accounts.values() if len(seen) > 1)


brokers = Brokers()


def place_trade(trade: Event, ctx: Context) -> Event:
    """Place a trade as the thread delegate demo does, and say which broker it came through."""
    with brokers.lock:
        brokers.placed[ctx.broker] += 1
        brokers.accounts.setdefault(str(trade["account"]), set()).add(ctx.broker)
    ordering_demo.place_trade(trade, ctx)
    ctx.log.debug("%s (%d) came through %s", trade["account"], trade["seq"], ctx.broker)
    return {"id": trade["id"], "account": trade["account"], "seq": trade["seq"], "kind": trade["kind"]}


def settle(confirmation: Event, ctx: Context) -> None:
    with brokers.lock:
        brokers.settled[ctx.broker] += 1
