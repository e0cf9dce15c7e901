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

    __slots__ = (
        "attempt", "context", "ctx", "delivery", "event", "failed", "lane", "settled", "span", "worker",
    )  # fmt: skip

    def __init__(self, delivery: Delivery, worker: int, attempt: int) -> None:
        self.delivery = delivery
        self.worker = worker
        self.attempt = attempt
        self.event: Event | None = None
        self.ctx: Any = None
        self.span: Any = None
        self.context: Any = None  # the ordering key's value (thread delegate), or None
        self.lane = "standard"  # or "priority": the lane it came from (ambulance / carpool)
        # True once a layer has acknowledged the delivery or handed it on (retry, parking).
        self.settled = False
        # True once the handler failed and on_error took the event (retry scheduled, parked).
        self.failed = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self.delivery.ack()


CallNext = Callable[[Envelope], Awaitable[None]]
Layer = Callable[[Envelope, CallNext], Awaitable[None]]


_MISSING = object()


def lookup(event: Event, path: str) -> Any:
    """The value at a dotted field path (`order.account`), or None when any part is missing."""
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return None
    return value
