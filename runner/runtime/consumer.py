"""A consumer service: its workers, the consume stack each delivery goes through, and its handler.

The stack, outermost first (written down here and nowhere else):
  trace → forwarding (when to ack) → decode (undecodable → dashboard) → dedupe (when set)
  → on_error (retry / park / workflow) → handler

A consumer with `on_error: workflow(...)` hands failed events to its workflow processor, a service
of its own (patterns.workflow).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import orjson

from ..brokers import Broker
from ..config.models import Consumer, Pipeline
from ..patterns.dedupe import dedupe
from ..patterns.forwarding import forwarding
from ..patterns.ordering import OrderedWorkers
from ..patterns.priority import PRIORITY, LaneRule, lane_queue
from ..patterns.supervisor import Supervisor, describe_decision
from ..patterns.workflow import WorkflowSender
from ..telemetry import Tracing
from ..types import CallNext, Envelope, Handler, Layer
from .context import EMPTY_CONFIG, Context
from .dashboard import Dashboard
from .failures import Retries, on_error
from .pool import IndependentWorkers, LaneSettings, PoolSettings, WorkerPool
from .publisher import Publisher
from .stats import ConsumerStats

DEFAULT_PREFETCH = 100


class HandlerResultError(TypeError):
    """A handler returned something other than a dict, a list of dicts or None."""


class ConsumerService:
    def __init__(
        self,
        name: str,
        spec: Consumer,
        *,
        handler: Handler,
        broker: Broker,
        tracing: Tracing,
        stats: ConsumerStats,
        parked: list[dict[str, Any]],
        executor: Executor,
        config: Mapping[str, Any] = EMPTY_CONFIG,
        lanes: Mapping[str, LaneRule] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.queue = spec.from_
        self.lane_queue = lane_queue(self.queue) if spec.priority_lane else None
        self.emit = spec.emit
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        self.broker = broker
        self.several_brokers = len(broker.urls) > 1  # pattern 9: spans say which one
        self.tracing = tracing
        self.stats = stats
        self.executor = executor
        self.config = config
        self.log = logging.getLogger(f"edarun.{name}")
        self.publisher = Publisher(broker, tracing, service=name, lanes=lanes)
        self.dashboard = Dashboard(self.publisher, name, stats, parked)
        self.retries = Retries()
        self.workflow: WorkflowSender | None = None
        if spec.on_error.action == "workflow":
            self.workflow = WorkflowSender(name, self.publisher, self.dashboard)
        # Called after each delivery, before its acknowledgement leaves (runtime.counters).
        self.mirror: Callable[[], None] | None = None
        self.prefetch = spec.prefetch or DEFAULT_PREFETCH
        self.max_workers = spec.autoscale.max if spec.autoscale else (spec.concurrency or 1)
        self._process = self.build_stack()
        self.pool: WorkerPool = self._pool()
        self.supervisor: Supervisor | None = None
        self._supervising: asyncio.Task[None] | None = None
        self._copies = 1  # consumers per unit of `concurrency` in this process (its instances)
        self._resizing: asyncio.Task[None] | None = None
        self._started = False
        self._own_executors: list[ThreadPoolExecutor] = []

    # -- the consume stack ---------------------------------------------------------------------

    def build_stack(self) -> CallNext:
        layers: list[Layer] = [
            *([self._trace] if self.tracing.enabled else []),
            forwarding(self.spec.delivery),
            self._decode,
            *([dedupe(self.spec.dedupe, self.stats, self.tracing)] if self.spec.dedupe else []),
            on_error(
                lambda: self.spec.on_error,
                dashboard=self.dashboard,
                stats=self.stats,
                retries=self.retries,
                tracing=self.tracing,
                republish=self._republish,
                in_place=self.spec.ordering is not None,
                workflow=self.workflow,
            ),
        ]
        call: CallNext = self._invoke
        for layer in reversed(layers):
            call = functools.partial(layer, call_next=call)  # type: ignore[call-arg]
        return call

    async def _trace(self, envelope: Envelope, call_next: CallNext) -> None:
        delivery = envelope.delivery
        attributes: dict[str, object] = {
            "edarun.attempt": envelope.attempt,
            "edarun.consumer": self.name,
            "edarun.redelivered": delivery.redelivered,
            "edarun.worker": envelope.worker,
        }
        if envelope.context is not None:
            attributes["edarun.context"] = envelope.context
        if self.lane_queue is not None:
            attributes["edarun.lane"] = envelope.lane
        if self.several_brokers:
            attributes["edarun.broker"] = delivery.broker
        with self.tracing.consume_span(
            delivery.queue,
            message_id=delivery.message_id,
            headers=delivery.headers,
            system=self.broker.system,
            attributes=attributes,
        ) as span:
            envelope.span = span
            await call_next(envelope)

    async def _decode(self, envelope: Envelope, call_next: CallNext) -> None:
        delivery = envelope.delivery
        try:
            event = orjson.loads(delivery.body)
            if not isinstance(event, dict):
                raise ValueError(f"expected a JSON object, got {type(event).__name__}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.stats.failed += 1
            self.tracing.failed(envelope.span, exc, {"edarun.workflow.action": "park"})
            acked, envelope.settled = envelope.settled, True
            await self.dashboard.park(
                delivery,
                f"undecodable body: {exc}",
                envelope.attempt,
                delivery.message_id,
                ack=not acked,
            )
            return
        envelope.event = event
        await call_next(envelope)

    async def _invoke(self, envelope: Envelope) -> None:
        delivery = envelope.delivery
        ctx = envelope.ctx = Context(
            self.queue,
            self.name,
            envelope.worker,
            envelope.attempt,
            delivery.redelivered,
            delivery.message_id,
            delivery.broker,
            self.log,
            envelope.span,
            context=envelope.context,
            lane=envelope.lane,
            config=self.config,
        )
        event = envelope.event
        assert event is not None  # the decode layer ran
        started = time.perf_counter()
        try:
            if self.is_async:
                result = await self.handler(event, ctx)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(self.handler, event, ctx)
                # copy_context: the consumer span stays current inside the worker thread.
                result = await loop.run_in_executor(self.executor, contextvars.copy_context().run, call)
        finally:
            self.stats.timed(time.perf_counter() - started)
        self.stats.processed += 1
        if envelope.lane == PRIORITY:
            self.stats.priority += 1
        outbox = ctx.outbox
        if result is None and not outbox:
            return
        if result is not None:
            emitted = result if isinstance(result, list) else [result]
            if not all(isinstance(e, dict) for e in emitted):
                raise HandlerResultError(
                    f"handler returned {type(result).__name__}; expected dict, list of dicts or None"
                )
            if self.emit is None:
                if emitted:
                    self.log.debug("return value of %s ignored: the consumer has no 'emit'", self.name)
            else:
                outbox = [*((self.emit, e, False) for e in emitted), *outbox]
        for queue, out, priority in outbox:
            await self.publisher.publish(queue, out, priority=priority)

    async def _republish(self, queue: str, body: bytes, message_id: str, headers: dict[str, Any]) -> None:
        await self.publisher.send(queue, body, message_id, headers)

    # -- workers -------------------------------------------------------------------------------

    def _pool(self) -> WorkerPool:
        ordering = self.spec.ordering
        # An ordered pool has one subscription for every worker: enough prefetch that other
        # contexts progress while one is slow.
        ordered_prefetch = max(DEFAULT_PREFETCH, 20 * self.max_workers)
        settings = PoolSettings(
            name=self.name,
            queue=self.queue,
            broker=self.broker,
            prefetch=self.spec.prefetch or (ordered_prefetch if ordering else DEFAULT_PREFETCH),
            process=self._process,
            stats=self.stats,
            after_each=self._after_each,
            lane=self._lane(),
        )
        if ordering is not None:
            return OrderedWorkers(settings, field=ordering.by)
        return IndependentWorkers(settings)

    def _lane(self) -> LaneSettings | None:
        lane = self.spec.priority_lane
        if lane is None or self.lane_queue is None:
            return None
        return LaneSettings(queue=self.lane_queue, mode=lane.mode, carpool=lane.carpool)

    def _after_each(self) -> None:
        if self.mirror is not None:
            self.mirror()

    def start(self, count: int, *, instances: int = 1) -> None:
        self._started = True
        policy = self.spec.autoscale
        if policy is None:
            self._copies = max(1, count // (self.spec.concurrency or 1))
            self.pool.start(count)
            return
        self.pool.start(policy.min)
        # Ambulance workers serve both lanes, so both count; carpool workers alone serve the lane.
        lane = self.spec.priority_lane
        queues = [self.queue]
        if self.lane_queue is not None and lane is not None and lane.mode == "ambulance":
            queues.append(self.lane_queue)
        self.supervisor = Supervisor(
            policy, consumer=self.name, queues=queues, broker=self.broker, pool=self.pool,
            instances=instances, decided=self._scaled,
        )  # fmt: skip
        self._supervising = asyncio.create_task(self.supervisor.run(), name=f"{self.name} supervisor")

    def apply_policy(self, model: Pipeline) -> None:
        """Adopt this consumer's edited policy (edarun up --reload) between two events: autoscale
        numbers, concurrency and retry numbers. The compare in config.changes let only these through."""
        spec = model.consumers.get(self.name)
        if spec is None or spec == self.spec:
            return
        if not self._started:
            self.spec = spec  # not started yet: `start` sizes the pool by it
            return
        old, self.spec = self.spec, spec
        most = spec.autoscale.max if spec.autoscale else (spec.concurrency or 1)
        if most > self.max_workers:
            # Sync handlers need a thread per consumer: a pool of this consumer's own, big enough.
            executor = ThreadPoolExecutor(most * self._copies, thread_name_prefix=f"edarun-{self.name}")
            self._own_executors.append(executor)
            self.executor = executor
        self.max_workers = most
        if spec.autoscale is not None and self.supervisor is not None:
            self.supervisor.apply_policy(spec.autoscale)  # it polls at once, by the new numbers
        elif spec.autoscale is None and (spec.concurrency or 1) != (old.concurrency or 1):
            self._resize((spec.concurrency or 1) * self._copies)
        self.log.info("%s: policy applied", self.name)

    def _resize(self, target: int) -> None:
        """A fixed pool to `target` consumers: more at once; fewer as consumers become idle (a busy
        one finishes its event first)."""
        if self._resizing is not None:
            self._resizing.cancel()
        pool = self.pool
        if pool.size < target:
            pool.start(target - pool.size)
            return

        async def shrink() -> None:
            while pool.size > target:
                pool.retire_idle(pool.size - target, 0.0)
                if pool.size > target:
                    await asyncio.sleep(0.05)

        self._resizing = asyncio.create_task(shrink(), name=f"{self.name} resize")

    def _scaled(self, before: int, after: int, depth: int) -> None:
        self.tracing.decision(f"autoscale {self.name}", describe_decision(before, after, depth))

    def held(self) -> int:
        """Deliveries this service holds unsettled: the broker counts them as unacknowledged."""
        return self.pool.held()

    @property
    def in_flight(self) -> int:
        """Handler calls running now."""
        return self.stats.in_flight

    async def drain(self) -> None:
        """Stop taking deliveries, let in-flight calls finish and acknowledge, flush retries."""
        if self.supervisor is not None:
            self.supervisor.stop()
            if self._supervising is not None:
                await self._supervising
        if self._resizing is not None:
            self._resizing.cancel()
        await self.pool.drain()
        await self.retries.flush()
        await self.pool.close()  # nothing should be left; whatever is goes back, marked
        for executor in self._own_executors:
            executor.shutdown(wait=False)
