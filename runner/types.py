"""The names the consume path passes around: the envelope, a handler, a layer and `call_next`.

A consumer's work on one delivery is a stack of layers composed in one place
(`runtime.consumer.build_stack`); each layer gets the envelope and the rest of the stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .brokers import Delivery

Event = dict[str, Any]
HandlerResult = Event | list[Event] | None
Handler = Callable[[Event, Any], HandlerResult | Awaitable[HandlerResult]]


class Envelope:
    """One delivery on its way through the stack, and what the layers learned about it."""

    __slots__ = ("attempt", "ctx", "delivery", "event", "settled", "span", "worker")

    def __init__(self, delivery: Delivery, worker: int, attempt: int) -> None:
        self.delivery = delivery
        self.worker = worker
        self.attempt = attempt
        self.event: Event | None = None
        self.ctx: Any = None
        self.span: Any = None
        # True once a layer has acknowledged the delivery or handed it on (retry, parking).
        self.settled = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self.delivery.ack()


CallNext = Callable[[Envelope], Awaitable[None]]
Layer = Callable[[Envelope, CallNext], Awaitable[None]]
