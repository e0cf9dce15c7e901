"""The supervisor consumer pattern's requests (pattern 5): a bursty source, a handler, response times.

`requests` is a `module:function` source: the talk's `get name for customer id <k>` requests in
three phases (`PHASES`), a steady trickle, a burst, then a quiet tail. The producer's `rate:` is a
single pace, so the source paces itself: sources are pulled lazily, so an async generator that sleeps
between events sets the pace of the producer. Each request carries `sent_at` (wall-clock seconds,
stamped as the producer takes it) and its phase.

`get_customer_name` is a coroutine that spends ~10 ms looking the name up (the simulated database
call) and records the request's response time (the moment it answered minus `sent_at`) in `responses`.
`responses` lives in this module, so an in-process run (examples/supervisor_consumer/run.py) reads
it afterwards; in a service process of its own (on RabbitMQ) it stays there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

# (phase, requests, per second): 1 s steady, a burst of 1,440 in about half a second, 5 s quiet.
PHASES = (("steady", 40, 40.0), ("burst", 1440, 3000.0), ("quiet", 20, 4.0))
LOOKUP_SECONDS = 0.010  # the simulated database call
NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tony")


async def requests() -> AsyncIterator[Event]:
    """The phases of PHASES, 1,500 requests in all (`count` may cap them earlier)."""
    loop = asyncio.get_running_loop()
    number = 0
    next_at = loop.time()
    for phase, count, per_second in PHASES:
        interval = 1.0 / per_second
        for _ in range(count):
            delay = next_at - loop.time()
            if delay > 0.001:  # below a millisecond, catch up instead of sleeping
                await asyncio.sleep(delay)
            number += 1
            customer = 1000 + (number * 7919) % 9000
            yield {
                "id": number,
                "request": f"get name for customer id {customer}",
                "customer": customer,
                "phase": phase,
                "sent_at": time.time(),
            }
            next_at += interval


@dataclass
class Response:
    id: int
    phase: str
    sent_at: float
    answered_at: float
    worker: int

    @property
    def seconds(self) -> float:
        return self.answered_at - self.sent_at


@dataclass
class Responses:
    """What the handler answered, in the order it answered."""

    answered: list[Response] = field(default_factory=list)

    def reset(self) -> None:
        self.answered = []


responses = Responses()


async def get_customer_name(request: Event, ctx: Context) -> None:
    """Answer `get name for customer id <k>` after ~10 ms and record the response time."""
    await asyncio.sleep(LOOKUP_SECONDS)  # the database call
    customer = int(request["customer"])
    name = f"{NAMES[customer % len(NAMES)]} #{customer}"
    answered_at = time.time()
    responses.answered.append(
        Response(
            int(request["id"]), str(request["phase"]), float(request["sent_at"]), answered_at, ctx.worker
        )
    )
    ctx.log.debug("%s → %s (%.0f ms)", request["request"], name, (answered_at - request["sent_at"]) * 1000)
