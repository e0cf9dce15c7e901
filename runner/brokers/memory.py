"""The embedded broker: per-queue FIFO with prefetch, acknowledgements and redelivery, in one process.

It mirrors RabbitMQ's delivery semantics (requeued messages go back to the head and are marked
redelivered; a cancelled consumer's unacknowledged messages return to the queue) but keeps nothing
across a crash of the process.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from .base import BrokerError, Delivery, Depth, Message

# Publishing and consuming never block on an in-memory queue; yield to the loop now and then so a
# fast producer or consumer cannot starve the other tasks (timers, signals, the live view).
_YIELD_EVERY = 64


class _Item:
    __slots__ = ("body", "headers", "message_id", "redelivered")

    def __init__(self, message: Message) -> None:
        self.body = message.body
        self.headers = message.headers
        self.message_id = message.message_id
        self.redelivered = False


class MemoryDelivery:
    __slots__ = ("_item", "_sub", "body", "headers", "message_id", "queue", "redelivered")

    def __init__(self, item: _Item, sub: MemorySubscription) -> None:
        self._item: _Item | None = item
        self._sub = sub
        self.body = item.body
        self.headers = item.headers
        self.message_id = item.message_id
        self.redelivered = item.redelivered
        self.queue = sub.queue.name

    def _settle(self) -> _Item | None:
        item, self._item = self._item, None
        if item is not None:
            self._sub.settled(item)
        return item

    async def ack(self) -> None:
        self._settle()

    async def nack(self, *, requeue: bool) -> None:
        item = self._settle()
        if item is not None and requeue:
            item.redelivered = True
            self._sub.queue.put_back([item])


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[_Item] = deque()
        self.waiting: deque[MemorySubscription] = deque()
        self.subscriptions: set[MemorySubscription] = set()

    def put(self, item: _Item) -> None:
        self.ready.append(item)
        if self.waiting:
            self._wake()

    def put_back(self, items: list[_Item]) -> None:
        self.ready.extendleft(reversed(items))
        self._wake()

    def _wake(self) -> None:
        # Round-robin like RabbitMQ: the longest-waiting subscription with room gets the next message.
        for _ in range(len(self.waiting)):
            if not self.ready:
                return
            sub = self.waiting.popleft()
            sub.wake()

    @property
    def unacked(self) -> int:
        return sum(len(sub.unacked) for sub in self.subscriptions)


class MemorySubscription:
    def __init__(self, queue: _Queue, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.unacked: dict[int, _Item] = {}
        self._signal: asyncio.Future[None] | None = None
        self._cancelled = False
        self._since_yield = 0

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        queue = self.queue
        while True:
            if self._cancelled:
                raise StopAsyncIteration
            if queue.ready and len(self.unacked) < self.prefetch:
                item = queue.ready.popleft()
                self.unacked[id(item)] = item
                self._since_yield += 1
                if self._since_yield >= _YIELD_EVERY:
                    self._since_yield = 0
                    await asyncio.sleep(0)
                return MemoryDelivery(item, self)
            self._signal = asyncio.get_running_loop().create_future()
            if len(self.unacked) < self.prefetch:
                queue.waiting.append(self)
            try:
                await self._signal
            finally:
                self._signal = None

    def wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    def settled(self, item: _Item) -> None:
        self.unacked.pop(id(item), None)
        if self._signal is not None and self not in self.queue.waiting:
            self.wake()  # it was full and waits for room: look at the queue again

    async def cancel(self) -> None:
        self._cancelled = True
        if self in self.queue.waiting:
            self.queue.waiting.remove(self)
        self.wake()

    async def close(self) -> None:
        await self.cancel()
        self.queue.subscriptions.discard(self)
        items = list(self.unacked.values())
        self.unacked.clear()
        for item in items:
            item.redelivered = True
        self.queue.put_back(items)


class MemoryBroker:
    """The `memory` broker: everything lives in this process."""

    system = "memory"

    def __init__(self, url: str = "memory") -> None:
        self.url = url
        self._queues: dict[str, _Queue] = {}
        self._closed = False
        self._since_yield = 0

    async def connect(self, timeout: float) -> None:
        return None

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        return queue

    async def declare(self, queue: str) -> None:
        self._queue(queue)

    async def publish(self, queue: str, message: Message) -> None:
        if self._closed:
            raise BrokerError("the memory broker is closed")
        target = self._queues.get(queue)
        if target is None:
            raise BrokerError(f"queue {queue!r} does not exist (unroutable message)")
        target.put(_Item(message))
        self._since_yield += 1
        if self._since_yield >= _YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)

    async def consume(self, queue: str, *, prefetch: int) -> MemorySubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        target = self._queue(queue)
        sub = MemorySubscription(target, prefetch)
        target.subscriptions.add(sub)
        return sub

    async def depth(self, queue: str) -> Depth:
        target = self._queues.get(queue)
        if target is None:
            return Depth(0, 0)
        return Depth(len(target.ready), target.unacked)

    def depth_now(self, queue: str) -> Depth:
        """Synchronous depth, for idle checks that must see one consistent instant."""
        target = self._queues.get(queue)
        return Depth(0, 0) if target is None else Depth(len(target.ready), target.unacked)

    async def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            for sub in list(queue.subscriptions):
                await sub.close()
