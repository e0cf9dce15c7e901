"""A producer service: pulls its source lazily, paces it, and publishes each event as a new trace."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..brokers import Broker
from ..config.expr import predicate
from ..config.models import FlowControl, Pipeline, Producer
from ..patterns.flow import FlowListener
from ..patterns.priority import LaneRule
from ..patterns.routing import NoRoute, Router
from ..telemetry import Tracing
from .context import SourceContext
from .failures import describe
from .publisher import Publisher
from .sources import SourceError, open_source
from .stats import ProducerStats


class ProducerService:
    def __init__(
        self,
        name: str,
        spec: Producer,
        *,
        source_file: Path | None,
        source_function: Any,
        broker: Broker,
        tracing: Tracing,
        stats: ProducerStats,
        skip: int = 0,
        lanes: Mapping[str, LaneRule] | None = None,
        flow: Mapping[str, FlowControl] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.source_file = source_file
        self.source_function = source_function
        self.stats = stats
        self.log = logging.getLogger(f"edarun.{name}")
        self.publisher = Publisher(broker, tracing, service=name, lanes=lanes)
        self.stopping = asyncio.Event()
        self.window = getattr(broker, "publish_window", 1)
        self.router = Router(spec.route) if spec.route is not None else None
        # Pattern 3: the producer marks events for the priority lane of their queue.
        self.marks = predicate(spec.priority) if spec.priority is not None else None
        self.skip = skip
        self.broker = broker
        # Pattern 8: a listener per flow-controlled queue this producer publishes to.
        self.flow = {
            q: FlowListener(q, policy, producer=name)
            for q, policy in (flow or {}).items()
            if q in spec.targets
        }
        self.mirror: Callable[[], None] | None = None  # see runtime.counters

    def apply_policy(self, model: Pipeline) -> None:
        """A new rate or priority mark (edarun up --reload), from the next event on."""
        spec = model.producers.get(self.name)
        if spec is not None and spec != self.spec:
            self.spec = spec
            self.marks = predicate(spec.priority) if spec.priority is not None else None
            self.log.info("%s: policy applied (rate %s, priority %s)", self.name, spec.rate, spec.priority)
        for queue, listener in self.flow.items():
            settings = model.queues.get(queue)
            if settings is not None and settings.flow_control is not None:
                listener.policy = settings.flow_control

    def target(self, event: dict[str, Any]) -> str:
        """The queue an event goes to: `to`, or its route (pattern 6); NoRoute when it has none."""
        if self.router is not None:
            return self.router.target(event)
        assert self.spec.to is not None  # the model requires one of `to` and `route`
        return self.spec.to

    async def run(self) -> None:
        try:
            for listener in self.flow.values():
                await listener.start(self.broker)
            for listener in self.flow.values():
                await listener.ready()  # learn the flow state before the first publish
            await self._run()
        finally:
            self.stats.done = True  # also when it failed before its first event: idle must not wait
            for listener in self.flow.values():
                await listener.close()

    async def _run(self) -> None:
        stats = self.stats
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        rate = self.spec.rate
        taken = 0
        # A flow-controlled producer keeps few publishes in flight: those already taken from the
        # source still go out after the monitor says "slow", and they add to the overshoot.
        window = ConfirmWindow(self, min(self.window, FLOW_WINDOW) if self.flow else self.window)
        source = open_source(self.source_file, self.source_function, SourceContext(self.name, self.log))
        try:
            async for item in source:
                if self.stopping.is_set():
                    break
                taken += 1
                if taken <= self.skip:  # published by an earlier run of this service
                    window.settled(taken)
                    continue
                if isinstance(item, SourceError):
                    stats.rejected += 1
                    self.log.error("%s: event rejected: %s", self.name, item)
                    window.settled(taken)
                else:
                    try:
                        queue = self.target(item)
                    except NoRoute as exc:
                        stats.rejected += 1
                        self.log.error("%s: event rejected: %s", self.name, exc)
                        window.settled(taken)
                    else:
                        listener = self.flow.get(queue) if self.flow else None
                        delay = listener.delay() if listener is not None else 0.0
                        if delay:
                            stats.delayed += 1
                            await asyncio.sleep(delay)  # slowed by the queue's flow monitor
                            if self.spec.rate:
                                next_at = loop.time()  # the pace restarts after the delay
                        await window.publish(taken, queue, item, delay)
                spec = self.spec  # read per event: --reload may change the rate
                if spec.count is not None and taken >= spec.count:
                    break
                interval = 1.0 / spec.rate if spec.rate else 0.0
                if spec.rate != rate:  # a new rate paces from now, not from the old schedule
                    rate, next_at = spec.rate, loop.time()
                if interval:
                    next_at += interval
                    delay = next_at - loop.time()
                    if delay > 0.001:  # below a millisecond, catch up instead of sleeping
                        await asyncio.sleep(delay)
            await window.drain()
        except SourceError as exc:
            self.log.error("%s: source failed: %s", self.name, exc)
            raise
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            stats.done = True


FLOW_WINDOW = 16


class ConfirmWindow:
    """Publishes in flight, at most `size` at once; an event counts as published when confirmed.

    On RabbitMQ a confirm is a network round trip, so one publish at a time would cap a producer at
    one event per round trip; the window keeps many confirms in flight (frames still go out in
    publish order). `confirmed` is the number of leading source events that are all settled
    (confirmed or rejected): where a restarted producer resumes.
    """

    def __init__(self, producer: ProducerService, size: int) -> None:
        self.producer = producer
        self.size = size
        self.pending: set[asyncio.Task[None]] = set()
        self._done: set[int] = set()
        self._room: asyncio.Future[None] | None = None
        self.stats = producer.stats

    def settled(self, index: int) -> None:
        stats = self.stats
        if index == stats.confirmed + 1:
            stats.confirmed = index
            done = self._done
            while stats.confirmed + 1 in done:
                stats.confirmed += 1
                done.discard(stats.confirmed)
        else:
            self._done.add(index)

    async def _one(self, index: int, queue: str, event: dict[str, Any], delayed: float) -> None:
        producer = self.producer
        marks = producer.marks
        try:
            marked = marks is not None and marks(event)
            extra: dict[str, object] | None = {"edarun.flow.delayed": delayed} if delayed else None
            await producer.publisher.publish(queue, event, root=True, priority=marked, attributes=extra)
        except Exception as exc:  # a broker's refusal, or anything else: counted, never fatal
            self.stats.rejected += 1
            producer.log.error("%s: publish failed: %s", producer.name, describe(exc))
        else:
            self.stats.published += 1
        self.settled(index)
        if producer.mirror is not None:
            producer.mirror()

    async def publish(self, index: int, queue: str, event: dict[str, Any], delayed: float = 0.0) -> None:
        if self.size <= 1:
            await self._one(index, queue, event, delayed)
            return
        task = asyncio.ensure_future(self._one(index, queue, event, delayed))
        self.pending.add(task)
        task.add_done_callback(self._finished)
        if len(self.pending) >= self.size:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def drain(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending)
