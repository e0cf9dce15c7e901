"""The order service of the event-forwarding demo: process an order, commit it, reply, and sometimes die.

The database is `ledger`. It lives in this module, outside the consumer's workers, so it survives a
worker's crash just as a real database survives the crash of the service that writes to it.

The crash: `ledger.reset(crash_at=(30, 60, 90))` arms three crash points. The first handler call
that is about to commit once the ledger holds 30 commits raises `SystemExit` ("the consumer process
died") instead, *before* its commit; likewise at 60 and 90. Each point fires once, because it is
removed from the ledger when it fires, so the order that comes back redelivered is committed normally.
Each crash hits a worker that has not crashed before (see `Ledger.crash_due`).
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

ACCOUNTS = ("B-123", "Q-665", "T-329", "D-945", "A-136", "V-976")


@dataclass(frozen=True)
class Crash:
    after_commits: int  # the ledger held this many commits when the handler died
    order: str  # the order the handler was about to commit
    worker: int  # the consumer worker that died


class Ledger:
    """The database, and what the demo observes about the handler calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, crash_at: Iterable[int] = ()) -> None:
        """An empty database; the handler dies once at each of the `crash_at` commit counts."""
        self.commits: Counter[str] = Counter()  # order id -> times committed
        self.redelivered: list[str] = []  # orders delivered again with ctx.redelivered set
        self.crash_at = sorted(crash_at)  # crash points still to come
        self.crashes: list[Crash] = []  # crash points that fired
        self.crashed_workers: set[int] = set()

    def commit(self, order: str) -> None:
        self.commits[order] += 1  # "Database commit."

    def crash_due(self, order: str, worker: int) -> bool:
        """Whether the handler dies now, before committing `order` (each crash point fires once).

        Only a worker that has not crashed yet dies: the runtime restarts a crashed worker after a
        back-off that grows with each crash of that worker (0.1 s, then 0.5 s, …), and the demo
        keeps every restart well inside the run.
        """
        committed = self.commits.total()
        if not self.crash_at or committed < self.crash_at[0] or worker in self.crashed_workers:
            return False
        self.crash_at.pop(0)
        self.crashed_workers.add(worker)
        self.crashes.append(Crash(committed, order, worker))
        return True


ledger = Ledger()


def orders() -> Iterator[dict[str, Any]]:
    """A `module:function` source: orders ORD-1001, ORD-1002, … (the producer's `count` caps it)."""
    number = 1000
    while True:
        number += 1
        yield {"id": f"ORD-{number}", "account": ACCOUNTS[number % len(ACCOUNTS)], "amount": number}


def _work_seconds(order: str) -> float:
    """10 to 30 ms of processing, fixed per order so the consumers drift out of step."""
    return 0.010 + (zlib.crc32(order.encode()) % 21) / 1000


async def commit_order(order: dict[str, Any], ctx: Context) -> None:
    """Process an order, commit it to the ledger ("Database commit."), then reply."""
    order_id = order["id"]
    if ctx.redelivered:
        ledger.redelivered.append(order_id)
    await asyncio.sleep(_work_seconds(order_id))  # processing
    if ledger.crash_due(order_id, ctx.worker):
        # Not a handler error (that would be retried or parked by `on_error`): the process dies
        # here, so nothing after this line runs for this order: no commit, no acknowledgement.
        raise SystemExit(f"the consumer process died while handling {order_id}")
    ledger.commit(order_id)
    await asyncio.sleep(0.003)  # the reply to the caller
