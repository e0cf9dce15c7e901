"""Handlers of the event-forwarding pipeline (pattern 1): commit a payment, then notify the buyer.

`commit_payment` is a coroutine that simulates the database commit the talk's demo prints
("Database commit."); edarun acknowledges the payment only after it returned and its confirmation
was confirmed by the broker. `notify_customer` is a plain function run in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

COMMIT_SECONDS = 0.002  # the simulated database round trip
FLAKY_EVERY = 50  # every 50th payment hits a transient database error on its first attempt


class DatabaseUnavailable(RuntimeError):
    """A transient failure of the (simulated) database: worth a retry."""


def sample_payments() -> Iterator[Event]:
    """A `module:function` source: five payments, for snippets and quick tries."""
    for number, (account, amount) in enumerate(
        (("A-136", 120.0), ("V-976", 75.5), ("B-123", 990.0), ("A-136", 12.25), ("Q-665", 300.0)),
        start=1,
    ):
        yield {"id": f"PAY-9{number:03d}", "order": f"ORD-9{number:03d}", "account": account,
               "amount": amount, "currency": "USD", "method": "card"}  # fmt: skip


async def commit_payment(payment: Event, ctx: Context) -> Event:
    """Commit one payment to the (simulated) database and return its confirmation.

    The first attempt of every FLAKY_EVERY-th payment raises DatabaseUnavailable: the consumer's
    `on_error` publishes a retry (attempt 2) after the back-off, and the payment is not lost.
    """
    number = int(str(payment["id"]).rpartition("-")[2] or 0)
    if number % FLAKY_EVERY == 0 and ctx.attempt == 1:
        raise DatabaseUnavailable(f"database busy while committing {payment['id']}")
    await asyncio.sleep(COMMIT_SECONDS)  # "Database commit."
    return {
        "payment": payment["id"],
        "order": payment["order"],
        "account": payment["account"],
        "amount": payment["amount"],
        "currency": payment["currency"],
        "committed_at": round(time.time(), 3),
        "attempt": ctx.attempt,
        "redelivered": ctx.redelivered,
    }


def notify_customer(confirmation: Event, ctx: Context) -> None:
    """Tell the customer the payment went through (here: a debug log line)."""
    ctx.log.debug(
        "payment %s of %s %s confirmed for %s",
        confirmation["payment"],
        confirmation["amount"],
        confirmation["currency"],
        confirmation["account"],
    )
