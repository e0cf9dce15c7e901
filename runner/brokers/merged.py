"""One subscription made of several: a multi-broker's consumer reads the same queue on every broker.

Each child is a subscription to one broker. Deliveries are taken from the children in turn, so no
broker's backlog waits behind another's; a child may be added later (a broker that was down when
the consumer started joins when it comes back). A delivery is settled on the child it came from:
the merged subscription only hands deliveries out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from .base import Delivery, Subscription

# Deliveries ready back to back never suspend the consumer: let the other tasks run now and then.
_YIELD_EVERY = 64


class MergedSubscription:
    """Subscriptions to one queue on several brokers, as one `Subscription`."""

    def __init__(self, queue: str, on_end: Callable[[MergedSubscription], None] | None = None) -> None:
        self.queue = queue
        self.children: dict[Any, Subscription] = {}  # broker → its subscription
        self._order: list[Subscription] = []  # the children, in the order they are asked
        self._next = 0  # the child asked first by the next poll
        self._listeners: list[Callable[[], None]] = []
        self._signal: asyncio.Future[None] | None = None
        self._armed = False  # `_arrived` waits on every child
        self._cancelled = False
        self._since_yield = 0
        self._on_end = on_end  # the multi-broker stops adding children to it

    def add(self, broker: Any, child: Subscription) -> bool:
        """Take `child`, the subscription on `broker`; False when it has one there already or was
        cancelled (the caller closes `child`)."""
        if self._cancelled or broker in self.children:
            return False
        self.children[broker] = child
        self._order.append(child)
        if self._armed:
            child.listen(self._arrived)
        self._arrived()  # it may hold deliveries already
        return True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    @property
    def held(self) -> int:
        return sum(child.held for child in self._order)

    @property
    def ended(self) -> bool:
        return self._cancelled and all(child.ended for child in self._order)

    @property
    def generation(self) -> int:
        return sum(child.generation for child in self._order)

    def poll(self) -> Delivery | None:
        order = self._order
        count = len(order)
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            delivery = order[index].poll()
            if delivery is not None:
                self._next = index + 1  # the next poll asks the one after it first: turns
                return delivery
        return None

    async def __anext__(self) -> Delivery:
        while True:
            delivery = self.poll()
            if delivery is not None:
                self._since_yield += 1
                if self._since_yield >= _YIELD_EVERY:
                    self._since_yield = 0
                    await asyncio.sleep(0)
                return delivery
            if self.ended:
                raise StopAsyncIteration
            signal = self._signal = asyncio.get_running_loop().create_future()
            self._arm()
            try:
                await signal
            finally:
                self._signal = None
                self._disarm_unless_listened()

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            for child in self._order:
                child.listen(self._arrived)

    def _disarm_unless_listened(self) -> None:
        # A child that keeps a listener nobody waits on would spend a wake-up a peer needs.
        if self._armed and not self._listeners and self._signal is None:
            self._armed = False
            for child in self._order:
                child.unlisten(self._arrived)

    def _arrived(self) -> None:
        """A child may have a delivery (or ended): wake whoever waits here, once."""
        if self._armed:
            self._armed = False
            for child in self._order:
                child.unlisten(self._arrived)
        signal = self._signal
        if signal is not None and not signal.done():
            signal.set_result(None)
        if self._listeners:
            listeners, self._listeners = self._listeners, []
            for callback in listeners:
                callback()

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)
        self._arm()

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)
        self._disarm_unless_listened()

    async def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            if self._on_end is not None:
                self._on_end(self)
        for child in list(self._order):
            await child.cancel()
        self._arrived()

    async def close(self) -> None:
        await self.cancel()
        for child in list(self._order):
            await child.close()
