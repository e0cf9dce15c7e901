"""The embedded broker: per-queue FIFO with prefetch, acknowledgements and redelivery, in one process.

It mirrors RabbitMQ's delivery semantics (requeued messages go back to the head and are marked
redelivered; a cancelled consumer's unacknowledged messages return to the queue) but keeps nothing
across a crash of the process. `memory://name` names one of several in a process (a multi-broker's
members); `go_down` and `come_back` stand for an outage of one, as a stopped RabbitMQ node would be.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from .base import BrokerError, BrokerUnavailable, Delivery, Depth, Message

# Publishing and consuming never block on an in-memory queue; yield to the loop now and then so a
# fast producer or consumer cannot starve the other tasks (timers, signals, the live view).
_YIELD_EVERY = 64


class MemoryDelivery:
    """A message in a memory queue; the same object is handed to the consumer that receives it.

    Requeueing puts a fresh copy back, so a late acknowledgement of the old one changes nothing.
    """

    __slots__ = ("_sub", "body", "broker", "headers", "message_id", "queue", "redelivered")

    def __init__(
        self, body: bytes, message_id: str, headers: dict[str, Any], queue: str, broker: str
    ) -> None:
        self.body = body
        self.message_id = message_id
        self.headers = headers
        self.queue = queue
        self.broker = broker
        self.redelivered = False
        self._sub: MemorySubscription | None = None

    @property
    def stale(self) -> bool:
        return False  # nothing here outlives its connection

    def again(self) -> MemoryDelivery:
        copy = MemoryDelivery(self.body, self.message_id, self.headers, self.queue, self.broker)
        copy.redelivered = True
        return copy

    async def ack(self) -> None:
        sub = self._sub
        if sub is not None:
            sub.settled(self)

    async def nack(self, *, requeue: bool) -> None:
        sub = self._sub
        if sub is not None and sub.settled(self) and requeue:
            sub.queue.put_back([self.again()])


class _Queue:
    def __init__(self, name: str, broker: str, *, down: bool = False) -> None:
        self.name = name
        self.broker = broker
        self.down = down  # its broker is down: nothing is handed out until it comes back
        self.ready: deque[MemoryDelivery] = deque()
        self.waiting: deque[MemorySubscription] = deque()
        self.subscriptions: set[MemorySubscription] = set()

    def put(self, item: MemoryDelivery) -> None:
        self.ready.append(item)
        if self.waiting:
            self._wake()

    def put_back(self, items: list[MemoryDelivery]) -> None:
        self.ready.extendleft(reversed(items))
        self._wake()

    def resume(self) -> None:
        self.down = False
        self._wake()

    def _wake(self) -> None:
        # Round-robin like RabbitMQ: the longest-waiting subscription with room gets the next message.
        for _ in range(min(len(self.waiting), len(self.ready))):
            sub = self.waiting.popleft()
            sub.wake()

    @property
    def unacked(self) -> int:
        return sum(len(sub.unacked) for sub in self.subscriptions)


class MemorySubscription:
    def __init__(self, queue: _Queue, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        # Outstanding deliveries in delivery order (a dict keeps it), as a closed channel returns them.
        self.unacked: dict[MemoryDelivery, None] = {}
        self._signal: asyncio.Future[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._cancelled = False
        self._since_yield = 0
        self.on_close: Callable[[], None] | None = None

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    @property
    def held(self) -> int:
        return len(self.unacked)

    @property
    def ended(self) -> bool:
        return self._cancelled

    @property
    def generation(self) -> int:
        return 0  # nothing here outlives its connection

    def poll(self) -> MemoryDelivery | None:
        queue = self.queue
        if self._cancelled or not queue.ready or len(self.unacked) >= self.prefetch or queue.down:
            return None
        delivery = queue.ready.popleft()
        delivery._sub = self
        self.unacked[delivery] = None
        return delivery

    async def __anext__(self) -> Delivery:
        while True:
            delivery = self.poll()
            if delivery is not None:
                self._since_yield += 1
                if self._since_yield >= _YIELD_EVERY:
                    self._since_yield = 0
                    await asyncio.sleep(0)
                return delivery
            if self._cancelled:
                raise StopAsyncIteration
            self._signal = asyncio.get_running_loop().create_future()
            self._arm()
            try:
                await self._signal
            finally:
                self._signal = None

    def _arm(self) -> None:
        """Ask the queue to wake this subscription when a message is ready for it."""
        if len(self.unacked) < self.prefetch and self not in self.queue.waiting:
            self.queue.waiting.append(self)

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)
        self._arm()

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)
        if not self._waiting and self in self.queue.waiting:
            # No one waits here any more: a wake-up spent on it would be lost to a waiting peer.
            self.queue.waiting.remove(self)

    @property
    def _waiting(self) -> bool:
        return self._signal is not None or bool(self._listeners)

    def wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)
        if self._listeners:
            listeners, self._listeners = self._listeners, []
            for callback in listeners:
                callback()

    def settled(self, delivery: MemoryDelivery) -> bool:
        """Forget an acknowledged or rejected delivery; False when it was not outstanding here."""
        if delivery not in self.unacked:
            return False
        del self.unacked[delivery]
        if self._waiting and self not in self.queue.waiting:
            self.wake()  # it was full and waits for room: look at the queue again
        return True

    async def cancel(self) -> None:
        self._cancelled = True
        if self in self.queue.waiting:
            self.queue.waiting.remove(self)
        self.wake()

    async def close(self) -> None:
        await self.cancel()
        self.queue.subscriptions.discard(self)
        if self.on_close is not None:
            self.on_close()
        items = [d.again() for d in self.unacked]
        self.unacked.clear()
        self.queue.put_back(items)


class MemoryBroker:
    """The `memory` broker: everything lives in this process."""

    system = "memory"
    publish_window = 1  # a publish is confirmed at once: nothing to pipeline
    spread_by: str | None = None

    def __init__(self, url: str = "memory") -> None:
        self.url = url
        self.urls: tuple[str, ...] = (url,)
        self._queues: dict[str, _Queue] = {}
        self._exchanges: dict[str, set[_Queue]] = {}  # fanout exchange → the queues bound to it
        self._listeners = 0
        self._closed = False
        self._down = False
        self._watchers: list[Callable[[], None]] = []
        self._since_yield = 0

    async def connect(self, timeout: float) -> None:
        return None

    # -- an outage, as a multi-broker sees one -------------------------------------------------

    @property
    def available(self) -> bool:
        return not self._down

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `available` changes."""
        self._watchers.append(callback)

    def go_down(self) -> None:
        """Refuse every operation and hand out nothing, keeping what the queues hold (a stopped
        node keeps its persistent messages); deliveries already handed out can still be settled."""
        self._down = True
        for queue in self._all_queues():
            queue.down = True
        self._changed()

    def come_back(self) -> None:
        self._down = False
        for queue in self._all_queues():
            queue.resume()
        self._changed()

    def _all_queues(self) -> list[_Queue]:
        return [*self._queues.values(), *(q for bound in self._exchanges.values() for q in bound)]

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    def _check(self, *, sending: bool = False) -> None:
        if sending and self._closed:
            raise BrokerError(f"the memory broker {self.url} is closed")
        if self._down:
            raise BrokerUnavailable(f"the memory broker {self.url} is down")

    # -- the protocol ----------------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name, self.url, down=self._down)
        return queue

    async def declare(self, queue: str, *, expires: float | None = None) -> None:
        self._check()
        self._queue(queue)  # nothing here outlives the process: `expires` has nothing to bound

    async def publish(self, queue: str, message: Message) -> str:
        if self._closed or self._down:
            self._check(sending=True)
        target = self._queues.get(queue)
        if target is None:
            raise BrokerError(f"queue {queue!r} does not exist (unroutable message)")
        target.put(MemoryDelivery(message.body, message.message_id, message.headers, queue, self.url))
        self._since_yield += 1
        if self._since_yield >= _YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)
        return self.url

    async def consume(self, queue: str, *, prefetch: int) -> MemorySubscription:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._check()
        target = self._queue(queue)
        sub = MemorySubscription(target, prefetch)
        target.subscriptions.add(sub)
        return sub

    async def broadcast(self, exchange: str, message: Message) -> None:
        self._check(sending=True)
        for queue in list(self._exchanges.get(exchange, ())):
            headers = dict(message.headers)
            queue.put(MemoryDelivery(message.body, message.message_id, headers, queue.name, self.url))

    async def listen(self, exchange: str) -> MemorySubscription:
        self._check()
        self._listeners += 1
        queue = _Queue(f"{exchange}.listener-{self._listeners}", self.url)
        bound = self._exchanges.setdefault(exchange, set())
        bound.add(queue)
        sub = MemorySubscription(queue, prefetch=100)
        queue.subscriptions.add(sub)
        sub.on_close = lambda: bound.discard(queue)  # exclusive: it goes with its listener
        return sub

    async def depth(self, queue: str) -> Depth:
        self._check()
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
        listeners = [q for bound in self._exchanges.values() for q in bound]
        for queue in [*self._queues.values(), *listeners]:
            for sub in list(queue.subscriptions):
                await sub.close()
