"""Thread delegate (pattern 2): `ordering: by_context(field)` keeps each context in publish order.

One subscription reads the queue in order; a dispatcher task owns the allocation map (context →
worker) and the in-flight count per (worker, context). A context is given to the least-loaded
worker one event at a time: while it has an event at a worker, its later events wait, in order, at
the dispatcher; when the count drops to 0 the context is released and its next event goes to
whichever worker is least loaded then. So workers added by autoscaling take over contexts as they
are released, and a context never runs on two workers at once. Each worker keeps a backlog, a FIFO
per context, and runs the head of a context that is not waiting out a retry, so a failing event
blocks its own context only. Workers talk to the dispatcher through its inbox; nothing else touches the maps.

Events without the field (or whose body does not decode) have no context: each is independent and
goes to the least-loaded worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from ..brokers import Delivery, Subscription
from ..runtime.failures import RetryInPlace, describe
from ..runtime.pool import PoolSettings, backoff, count_consumers, envelope_for
from ..types import Envelope, lookup
from .priority import PRIORITY, OrderGuard, PriorityFeed

Hashable = str | int | float | bool
SWEEP_EVERY = 0.25  # seconds between looks at a lane that held events wait on
SWEEP_SETTLE = 0.1
# After a reconnect the broker pushes back what the dead channels held; until that has surely
# arrived, a lane looking empty proves nothing (its events may be on the wire), so no sweep.
RECONNECT_GRACE = 1.5
Make = Callable[[Delivery, int], Envelope]  # builds the envelope of a delivery for a worker
_NO_CONTEXT = object()


def context_of(body: bytes, field: str) -> Any:
    """The context value of a message body, or None when there is none to order by."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    value = lookup(event, field)
    return value if isinstance(value, Hashable) else None


class Backlog:
    """One worker's pending events, a FIFO per context; the worker runs one event at a time.

    A context holding a priority-lane event runs before the others (ambulance, pattern 3): its head
    first, since even a priority event waits for its own context's earlier events.
    """

    def __init__(self) -> None:
        self.contexts: OrderedDict[Any, deque[Envelope]] = OrderedDict()
        self.urgent: dict[Any, int] = {}  # context → priority events queued in it
        self.blocked_until: dict[Any, float] = {}
        self.retiring = False
        self.stopped = False
        self._signal: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(queue) for queue in self.contexts.values())

    def put(self, key: Any, envelope: Envelope) -> None:
        self.contexts.setdefault(key, deque()).append(envelope)
        if envelope.lane == PRIORITY:
            self.urgent[key] = self.urgent.get(key, 0) + 1
        self._wake()

    def _wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    def _runnable(self, now: float) -> tuple[Any, Envelope] | None:
        blocked = self.blocked_until
        for key in self.urgent:
            if blocked.get(key, 0.0) <= now:
                return key, self.contexts[key][0]
        for key, queue in self.contexts.items():
            if queue and self.blocked_until.get(key, 0.0) <= now:
                self.contexts.move_to_end(key)  # round-robin between contexts
                return key, queue[0]
        return None

    async def next(self) -> tuple[Any, Envelope] | None:
        """The head of a runnable context; None once retiring and empty."""
        loop = asyncio.get_running_loop()
        while True:
            if self.stopped:
                return None
            found = self._runnable(loop.time())
            if found is not None:
                return found
            if self.retiring and not len(self):
                return None
            self._signal = loop.create_future()
            if self.blocked_until and self._timer is None:
                wake_at = min(self.blocked_until.values())
                self._timer = loop.call_at(wake_at, self._timer_fired)
            try:
                await self._signal
            finally:
                self._signal = None

    def _timer_fired(self) -> None:
        self._timer = None
        self._wake()

    def block(self, key: Any, delay: float) -> None:
        """Hold the context's head for `delay` (a retry back-off); other contexts go on."""
        self.blocked_until[key] = asyncio.get_running_loop().time() + delay
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pop(self, key: Any) -> None:
        queue = self.contexts[key]
        if queue.popleft().lane == PRIORITY:
            left = self.urgent[key] - 1
            if left:
                self.urgent[key] = left
            else:
                del self.urgent[key]
        self.blocked_until.pop(key, None)
        if not queue:
            del self.contexts[key]

    def retire(self) -> None:
        self.retiring = True
        self._wake()

    def stop(self) -> None:
        """Drain: the worker finishes its current event and takes no other."""
        self.stopped = True
        self._wake()


class Dispatcher:
    """Owns the allocation map; everything reaches it as a message in its inbox.

    With a priority lane, an `OrderGuard` first holds back any event whose predecessor of the same
    context, from the other lane, has not reached the dispatcher yet; carpool workers get priority
    events only, and the other workers standard events only.
    """

    def __init__(self, field: str, *, queue: str | None = None, lane: str | None = None) -> None:
        self.field = field
        self.lane = lane
        self.guard = OrderGuard(queue, lane) if queue is not None and lane is not None else None
        self.carpool: set[int] = set()
        self.allocation_map: dict[Any, int] = {}
        self.in_flight: Counter[tuple[int, Any]] = Counter()
        self.load: dict[int, int] = {}  # events given to a worker and not finished
        self.backlogs: dict[int, Backlog] = {}
        # Events of a context that has one at a worker already, waiting their turn in order.
        self.pending: dict[Any, deque[tuple[Delivery, Make]]] = {}
        self.inbox: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        self._unique = 0

    # -- what other tasks send -----------------------------------------------------------------

    def deliver(self, delivery: Delivery, make: Make) -> None:
        self.inbox.put_nowait(("deliver", delivery, make))

    def finished(self, worker: int, key: Any) -> None:
        self.inbox.put_nowait(("finished", worker, key))

    def add_worker(self, worker: int, *, carpool: bool = False) -> Backlog:
        backlog = self.backlogs[worker] = Backlog()
        self.load[worker] = 0
        if carpool:
            self.carpool.add(worker)
        return backlog

    def retire_worker(self, worker: int) -> None:
        self.inbox.put_nowait(("retire", worker, None))

    def reconnected(self) -> None:
        """The feed's subscription reconnected (see OrderGuard.reconnected)."""
        self.inbox.put_nowait(("reconnected", None, None))

    def drained(self, queue: str, since: float) -> None:
        """`queue` had nothing left to deliver when looked at after `since` (see OrderGuard)."""
        self.inbox.put_nowait(("drained", queue, since))

    def waiting_on(self) -> set[str]:
        """The lanes whose events some held event waits for."""
        return self.guard.waiting_on() if self.guard is not None else set()

    # -- the owner task ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reconnected_at = -RECONNECT_GRACE  # loop time of the last reconnect
        while True:
            kind, first, second = await self.inbox.get()
            if kind == "deliver":
                if self.guard is None:
                    self._route(first, second)
                else:
                    for delivery, make in self.guard.admit(first, (first, second), loop.time()):
                        self._route(delivery, make)
            elif kind == "reconnected":
                if self.guard is not None:
                    self.guard.reconnected()
                reconnected_at = loop.time()
            elif kind == "drained":
                assert self.guard is not None
                if second < reconnected_at + RECONNECT_GRACE:
                    continue  # the sweep looks again
                for delivery, make in self.guard.drained(first, second):
                    self._route(delivery, make)
            elif kind == "finished":
                self._release(first, second)
            elif kind == "retire":
                self._retire(first)

    def _route(self, delivery: Delivery, make: Make) -> None:
        context = context_of(delivery.body, self.field)
        if context is None:
            self._unique += 1
            self._give((_NO_CONTEXT, self._unique), None, delivery, make)  # ordered with nothing
        elif context in self.allocation_map:
            self.pending.setdefault(context, deque()).append((delivery, make))
        else:
            self._give(context, context, delivery, make)

    def _give(self, key: Any, context: Any, delivery: Delivery, make: Make) -> None:
        worker = self._least_loaded(bool(self.carpool) and delivery.queue == self.lane)
        if context is not None:
            self.allocation_map[context] = worker
        self.in_flight[(worker, key)] += 1
        self.load[worker] += 1
        envelope = make(delivery, worker)
        envelope.context = context
        self.backlogs[worker].put(key, envelope)

    def _least_loaded(self, carpool: bool) -> int:
        """Carpool workers for a priority event, when there are; otherwise the others."""
        candidates = [
            w for w, backlog in self.backlogs.items()
            if not backlog.retiring and (w in self.carpool) == carpool
        ] or [w for w in self.backlogs if (w in self.carpool) == carpool] or list(self.backlogs)  # fmt: skip
        return min(candidates, key=lambda w: (self.load[w], w))

    def _release(self, worker: int, key: Any) -> None:
        self.in_flight[(worker, key)] -= 1
        self.load[worker] -= 1
        if self.in_flight[(worker, key)] <= 0:
            del self.in_flight[(worker, key)]
            if self.allocation_map.get(key) == worker:
                del self.allocation_map[key]  # released: its next event may go anywhere
                waiting = self.pending.get(key)
                if waiting:
                    delivery, make = waiting.popleft()
                    if not waiting:
                        del self.pending[key]
                    self._give(key, key, delivery, make)

    def _retire(self, worker: int) -> None:
        backlog = self.backlogs.get(worker)
        if backlog is not None:
            backlog.retire()  # it finishes what it holds; new contexts go elsewhere

    def forget(self, worker: int) -> None:
        """A retired worker has stopped."""
        self.backlogs.pop(worker, None)
        self.load.pop(worker, None)

    def idle_workers(self) -> list[int]:
        """Workers autoscaling may retire: idle, and not carpool."""
        return [
            w for w, backlog in self.backlogs.items()
            if not backlog.retiring and self.load.get(w, 0) == 0 and w not in self.carpool
        ]  # fmt: skip


class OrderedWorkers:
    """The worker pool of an ordered consumer: one subscription, a dispatcher, workers.

    Same interface as `runtime.pool.IndependentWorkers`, so autoscaling works the same way. A
    worker that dies (a handler raising SystemExit) takes the pool down with it, like a process:
    every unacknowledged delivery goes back to the queue, marked, and the pool restarts afresh.
    """

    def __init__(self, settings: PoolSettings, *, field: str) -> None:
        self.name, self.queue, self.broker = settings.name, settings.queue, settings.broker
        self.prefetch, self.process, self.stats = settings.prefetch, settings.process, settings.stats
        self.after_each, self.field = settings.after_each, field
        self.lane = settings.lane
        self.lane_queue = self.lane.queue if self.lane is not None else None
        self._make: Make = functools.partial(envelope_for, lane=self.lane_queue)
        self.log = logging.getLogger(f"edarun.{settings.name}")
        self.dispatcher = self._dispatcher()
        self.arrived: Counter[str] = Counter()  # deliveries per queue (lane or standard)
        self.subscription: Subscription | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.idle_since: dict[int, float] = {}
        self._next_id = 0
        self._stopping = False
        self._crashes = 0
        self._restarting = False
        self._running = False  # the feed and the dispatcher (and with a lane, its sweep) run

    def _dispatcher(self) -> Dispatcher:
        return Dispatcher(self.field, queue=self.queue, lane=self.lane_queue)

    @property
    def size(self) -> int:
        """Workers that serve the standard queue: what autoscaling sizes."""
        carpool = self.dispatcher.carpool
        backlogs = self.dispatcher.backlogs.items()
        return sum(1 for w, backlog in backlogs if not backlog.retiring and w not in carpool)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def start(self, count: int) -> None:
        if not self._running:
            self._running = True
            self._spawn(self._feed(), f"{self.name} feed")
            self._spawn(self.dispatcher.run(), f"{self.name} dispatch")
            if self.lane is not None:
                self._spawn(self._sweep(), f"{self.name} lanes")
                if self.lane.mode == "carpool":
                    for _ in range(self.lane.carpool):
                        self._add(carpool=True)
        for _ in range(count):
            self._add(carpool=False)
        self._count()

    def _add(self, *, carpool: bool) -> None:
        self._next_id += 1
        worker = self._next_id
        backlog = self.dispatcher.add_worker(worker, carpool=carpool)
        self.idle_since[worker] = asyncio.get_running_loop().time()
        self.workers[worker] = self._spawn(self._run(worker, backlog), f"{self.name}#{worker}")

    def _count(self) -> None:
        count_consumers(self.stats, self.size + len(self.dispatcher.carpool))

    def retire_idle(self, count: int, idle_for: float) -> int:
        now = asyncio.get_running_loop().time()
        idle = [
            w for w in self.dispatcher.idle_workers()
            if w in self.idle_since and now - self.idle_since[w] >= idle_for
        ]  # fmt: skip
        chosen = sorted(idle, key=lambda w: self.idle_since[w])[:count]
        for worker in chosen:
            self.dispatcher.backlogs[worker].retiring = True  # no new contexts from now on
            self.dispatcher.retire_worker(worker)
        self._count()
        return len(chosen)

    def held(self) -> int:
        return self.subscription.held if self.subscription is not None else 0

    async def _feed(self) -> None:
        standard = await self.broker.consume(self.queue, prefetch=self.prefetch)
        if self.lane_queue is None:
            self.subscription = standard
        else:
            # A wider window for the lane: priority events held for their predecessors sit in it,
            # and a later priority event must still get through (see OrderGuard).
            lane = await self.broker.consume(self.lane_queue, prefetch=max(4 * self.prefetch, 400))
            self.subscription = PriorityFeed(lane, standard, owns_lane=True)
        arrived, make = self.arrived, self._make
        subscription = self.subscription
        generation = subscription.generation
        async for delivery in subscription:
            if subscription.generation != generation:
                generation = subscription.generation
                self.dispatcher.reconnected()
            self.stats.received += 1
            arrived[delivery.queue] += 1
            self.dispatcher.deliver(delivery, make)

    async def _sweep(self) -> None:
        """Tell the dispatcher when a lane that held events wait on has nothing left to deliver.

        An event waits for its context's predecessor in the other lane; if that one was processed
        before this consumer started it never arrives. Once that lane has no ready messages and no
        delivery arrived while we looked, everything published to it before has reached us.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            for queue in self.dispatcher.waiting_on():
                since, before = loop.time(), self.arrived[queue]
                depth = await self.broker.depth(queue)
                await asyncio.sleep(SWEEP_SETTLE)  # a delivery already on its way lands meanwhile
                if depth.ready == 0 and depth.complete and self.arrived[queue] == before:
                    self.dispatcher.drained(queue, since)

    async def _run(self, worker: int, backlog: Backlog) -> None:
        stats, loop = self.stats, asyncio.get_running_loop()
        try:
            while (item := await backlog.next()) is not None:
                key, envelope = item
                if envelope.delivery.stale:
                    # Its channel died: RabbitMQ delivers it again, after the ones before it.
                    backlog.pop(key)
                    self.dispatcher.finished(worker, key)
                    continue
                stats.in_flight += 1
                self.idle_since.pop(worker, None)
                try:
                    await self.process(envelope)
                except RetryInPlace as retry:
                    envelope.attempt += 1
                    envelope.failed = False
                    backlog.block(key, retry.delay)  # its context waits; the others go on
                    continue
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except BaseException as exc:  # SystemExit from a handler: the pool died
                    self._spawn(self._restart(exc), f"{self.name} restart")
                    return
                finally:
                    stats.in_flight -= 1
                    self.idle_since[worker] = loop.time()
                    if self.after_each is not None:
                        self.after_each()
                backlog.pop(key)
                self.dispatcher.finished(worker, key)
        finally:
            self.workers.pop(worker, None)
            self.idle_since.pop(worker, None)
            if backlog.retiring and not self._stopping and not self._restarting:
                self.dispatcher.forget(worker)
                self._count()

    async def _restart(self, exc: BaseException) -> None:
        if self._restarting or self._stopping:
            return
        self._restarting = True
        count = max(self.size, 1)
        delay = backoff(self._crashes)
        self._crashes += 1
        self.stats.restarts += 1
        self.log.error(
            "%s worker crashed (%s); restarting the ordered pool in %.1fs", self.name, describe(exc), delay
        )
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self.tasks if t is not current), return_exceptions=True)
        if self.subscription is not None:
            await self.subscription.close()  # everything unacknowledged goes back, marked
            self.subscription = None
        self.stats.in_flight = 0
        self._running = False
        self.dispatcher = self._dispatcher()
        self.workers.clear()
        self.idle_since.clear()
        await asyncio.sleep(delay)
        self._restarting = False
        if not self._stopping:
            self.start(count)

    async def drain(self) -> None:
        """Finish only what the workers are running now; everything in their backlogs goes back."""
        self._stopping = True
        if self.subscription is not None:
            await self.subscription.cancel()
        for backlog in self.dispatcher.backlogs.values():
            backlog.stop()
        if self.workers:
            await asyncio.gather(*self.workers.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.subscription is not None:
            await self.subscription.close()
            self.subscription = None
        self.stats.consumers = 0
