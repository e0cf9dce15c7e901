"""A consumer's workers: how many there are, how they get deliveries, how they stop or die.

`IndependentWorkers` gives each worker its own broker subscription (its own prefetch window): the
default. The ordered pool of the thread delegate pattern (`patterns.ordering.OrderedWorkers`) has
the same interface. Both grow and shrink while they run (the supervisor consumer pattern), and a
worker that dies (a handler raising SystemExit) gives back what it held and is restarted.

With a priority lane (pattern 3), ambulance workers share one lane subscription and each reads it
before its own standard subscription, so whichever worker is free next takes a priority event;
carpool workers each read only the lane, are not counted by autoscaling and never retire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..brokers import Broker, Delivery, Subscription
from ..patterns.priority import PRIORITY, PriorityFeed
from ..types import Envelope
from .failures import describe
from .publisher import ATTEMPT
from .stats import ConsumerStats

Process = Callable[[Envelope], Awaitable[None]]
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
HEALTHY_AFTER = 30.0


class WorkerPool(Protocol):
    def start(self, count: int) -> None:
        """Add `count` workers now."""

    def retire_idle(self, count: int, idle_for: float) -> int:
        """Retire up to `count` workers idle for `idle_for` seconds; returns how many."""

    @property
    def size(self) -> int: ...

    def held(self) -> int:
        """Deliveries received and not yet settled."""

    async def drain(self) -> None:
        """Stop taking deliveries; let every worker finish and acknowledge what it has."""

    async def close(self) -> None:
        """After drain (and the retries' flush): return whatever is still held."""


def count_consumers(stats: ConsumerStats, size: int) -> None:
    """The live view's and the report's consumer figures, after a pool grew or shrank."""
    stats.consumers = size
    stats.max_consumers = max(stats.max_consumers, size)


def envelope_for(delivery: Delivery, worker: int, lane: str | None = None) -> Envelope:
    """The envelope of a delivery; `lane` is the consumer's lane queue, when it has one."""
    attempt = delivery.headers.get(ATTEMPT, 1)
    envelope = Envelope(delivery, worker, attempt if isinstance(attempt, int) else 1)
    if lane is not None and delivery.queue == lane:
        envelope.lane = PRIORITY
    return envelope


def backoff(failures: int) -> float:
    return RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]


@dataclass(frozen=True)
class LaneSettings:
    """A consumer's priority lane (pattern 3): its queue and who serves it."""

    queue: str
    mode: str  # ambulance | carpool
    carpool: int  # carpool: workers that serve only the lane


@dataclass(frozen=True)
class PoolSettings:
    """What any worker pool of a consumer needs: where to read, what to run, what to count."""

    name: str
    queue: str
    broker: Broker
    prefetch: int
    process: Process
    stats: ConsumerStats
    after_each: Callable[[], None] | None = None  # after each delivery, before its ack leaves
    lane: LaneSettings | None = None


class IndependentWorkers:
    def __init__(self, settings: PoolSettings) -> None:
        self.name, self.queue, self.broker = settings.name, settings.queue, settings.broker
        self.prefetch, self.process, self.stats = settings.prefetch, settings.process, settings.stats
        self.after_each = settings.after_each
        self.lane = settings.lane
        self.lane_queue = self.lane.queue if self.lane is not None else None
        self.log = logging.getLogger(f"edarun.{settings.name}")
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.subscriptions: dict[int, Subscription] = {}
        self.idle_since: dict[int, float] = {}  # worker → when it finished its last delivery
        self.retiring: set[int] = set()
        self.carpool: set[int] = set()  # workers that serve only the priority lane
        self._shared_lane: asyncio.Task[Subscription] | None = None  # ambulance: one for all workers
        self._stopping = asyncio.Event()
        self._cancels: set[asyncio.Future[None]] = set()
        self._next_id = 0

    @property
    def size(self) -> int:
        """Workers that serve the standard queue: what autoscaling sizes."""
        return len(self.workers) - len(self.retiring) - len(self.carpool)

    def start(self, count: int) -> None:
        if self.lane is not None and self.lane.mode == "carpool" and not self.carpool:
            for _ in range(self.lane.carpool):
                self.carpool.add(self._spawn())
        for _ in range(count):
            self._spawn()
        self._count()

    def _spawn(self) -> int:
        self._next_id += 1
        worker = self._next_id
        self.idle_since[worker] = asyncio.get_running_loop().time()
        task = asyncio.create_task(self._supervised(worker), name=f"{self.name}#{worker}")
        self.workers[worker] = task
        task.add_done_callback(functools.partial(self._gone, worker))
        return worker

    def _gone(self, worker: int, _: object = None) -> None:
        self.workers.pop(worker, None)
        self.idle_since.pop(worker, None)
        self.retiring.discard(worker)
        self.carpool.discard(worker)
        self._count()

    def _count(self) -> None:
        count_consumers(self.stats, self.size + len(self.carpool))

    def retire_idle(self, count: int, idle_for: float) -> int:
        now = asyncio.get_running_loop().time()
        idle = [
            w for w, since in self.idle_since.items()
            if w not in self.retiring and w not in self.carpool and now - since >= idle_for
        ]  # fmt: skip
        for worker in sorted(idle, key=lambda w: self.idle_since[w])[:count]:
            self.retiring.add(worker)
            subscription = self.subscriptions.get(worker)
            if subscription is not None:
                # It stops taking deliveries; what it prefetched goes back when it closes.
                task = asyncio.ensure_future(subscription.cancel())
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
        self._count()
        return min(count, len(idle))

    def held(self) -> int:
        held = sum(sub.held for sub in self.subscriptions.values())
        shared = self._shared_lane
        if shared is not None and shared.done() and not shared.cancelled() and not shared.exception():
            held += shared.result().held
        return held

    async def _supervised(self, worker: int) -> None:
        """Run one worker; an unexpected crash (not a handler error) restarts it with back-off."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set() and worker not in self.retiring:
            started = loop.time()
            try:
                await self._work(worker)
                break
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException as exc:  # SystemExit from a handler too: that worker died
                subscription = self.subscriptions.pop(worker, None)
                if subscription is not None:
                    await subscription.close()  # what it held goes back to the queue
                if loop.time() - started > HEALTHY_AFTER:
                    failures = 0  # a worker that ran well for a while starts its back-off afresh
                delay = backoff(failures)
                failures += 1
                self.stats.restarts += 1
                self.log.error(
                    "%s worker %d crashed (%s); restarting in %.1fs", self.name, worker, describe(exc), delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        if worker in self.retiring:
            subscription = self.subscriptions.pop(worker, None)
            if subscription is not None:
                await subscription.close()

    async def _subscribe(self, worker: int) -> Subscription:
        lane = self.lane
        if lane is None:
            return await self.broker.consume(self.queue, prefetch=self.prefetch)
        if worker in self.carpool:
            return await self.broker.consume(lane.queue, prefetch=self.prefetch)
        if lane.mode == "carpool":
            return await self.broker.consume(self.queue, prefetch=self.prefetch)
        shared_lane = self._shared_lane
        failed = (
            shared_lane is not None
            and shared_lane.done()
            and (shared_lane.cancelled() or shared_lane.exception() is not None)
        )
        if shared_lane is None or failed:
            # The first ambulance worker opens the lane for all; one that failed is opened again.
            shared_lane = self._shared_lane = asyncio.ensure_future(
                self.broker.consume(lane.queue, prefetch=self.prefetch)
            )
        shared = await asyncio.shield(shared_lane)
        standard = await self.broker.consume(self.queue, prefetch=self.prefetch)
        return PriorityFeed(shared, standard, owns_lane=False)

    async def _work(self, worker: int) -> None:
        subscription = await self._subscribe(worker)
        self.subscriptions[worker] = subscription
        if self._stopping.is_set() or worker in self.retiring:  # stopped while (re)starting
            return
        stats, process, loop, lane = self.stats, self.process, asyncio.get_running_loop(), self.lane_queue
        async for delivery in subscription:
            stats.in_flight += 1
            stats.received += 1
            self.idle_since.pop(worker, None)
            envelope = envelope_for(delivery, worker, lane)
            try:
                await process(envelope)
            except BaseException:
                if lane is not None and envelope.lane == PRIORITY and not envelope.settled:
                    # From the shared lane, which outlives this worker: give it back now.
                    with contextlib.suppress(Exception):
                        await delivery.nack(requeue=True)
                raise
            finally:
                stats.in_flight -= 1
                self.idle_since[worker] = loop.time()
                if self.after_each is not None:
                    self.after_each()

    async def drain(self) -> None:
        self._stopping.set()
        for subscription in list(self.subscriptions.values()):
            await subscription.cancel()
        shared = await self._lane_subscription()
        if shared is not None:
            await shared.cancel()
        if self.workers:
            await asyncio.gather(*self.workers.values(), return_exceptions=True)

    async def _lane_subscription(self) -> Subscription | None:
        if self._shared_lane is None:
            return None
        try:
            return await self._shared_lane
        except Exception:
            return None  # never came up: its worker failed and restarted without it

    async def close(self) -> None:
        """After drain and the retries' flush: return anything still held."""
        for subscription in self.subscriptions.values():
            await subscription.close()
        self.subscriptions.clear()
        shared = await self._lane_subscription()
        if shared is not None:
            await shared.close()
        self.stats.consumers = 0
