"""A consumer service: its workers, the consume stack each delivery goes through, and its handler.

The stack, outermost first (written down here and nowhere else):
  trace → forwarding (when to ack) → decode (undecodable → dashboard) → dedupe (when set)
  → on_error (retry / park) → handler
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import orjson

from ..brokers import Broker, Subscription
from ..config.models import Consumer
from ..patterns.dedupe import dedupe
from ..patterns.forwarding import forwarding
from ..telemetry import Tracing
from ..types import CallNext, Envelope, Handler, Layer
from .context import EMPTY_CONFIG, Context
from .dashboard import Dashboard
from .failures import Retries, describe, on_error
from .publisher import ATTEMPT, Publisher
from .stats import ConsumerStats

DEFAULT_PREFETCH = 100
_RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)
_HEALTHY_AFTER = 30.0


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
    ) -> None:
        self.name = name
        self.spec = spec
        self.queue = spec.from_
        self.emit = spec.emit
        self.handler = handler
        self.is_async = inspect.iscoroutinefunction(handler)
        self.broker = broker
        self.broker_url = broker.url
        self.tracing = tracing
        self.stats = stats
        self.executor = executor
        self.config = config
        self.log = logging.getLogger(f"edarun.{name}")
        self.publisher = Publisher(broker, tracing, service=name)
        self.dashboard = Dashboard(self.publisher, name, stats, parked)
        self.retries = Retries()
        self._stopping = asyncio.Event()
        # Called after each delivery, before its acknowledgement leaves (runtime.counters).
        self.mirror: Callable[[], None] | None = None
        self.prefetch = spec.prefetch or DEFAULT_PREFETCH
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.subscriptions: dict[int, Subscription] = {}
        self._process = self.build_stack()

    # -- the consume stack ---------------------------------------------------------------------

    def build_stack(self) -> CallNext:
        layers: list[Layer] = [
            *([self._trace] if self.tracing.enabled else []),
            forwarding(self.spec.delivery),
            self._decode,
            *([dedupe(self.spec.dedupe, self.stats, self.tracing)] if self.spec.dedupe else []),
            on_error(
                self.spec.on_error,
                dashboard=self.dashboard,
                stats=self.stats,
                retries=self.retries,
                tracing=self.tracing,
                republish=self._republish,
            ),
        ]
        call: CallNext = self._invoke
        for layer in reversed(layers):
            call = functools.partial(layer, call_next=call)  # type: ignore[call-arg]
        return call

    async def _trace(self, envelope: Envelope, call_next: CallNext) -> None:
        delivery = envelope.delivery
        with self.tracing.consume_span(
            delivery.queue,
            message_id=delivery.message_id,
            headers=delivery.headers,
            system=self.broker.system,
            attributes={
                "edarun.attempt": envelope.attempt,
                "edarun.consumer": self.name,
                "edarun.redelivered": delivery.redelivered,
            },
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
            delivery.queue,
            self.name,
            envelope.worker,
            envelope.attempt,
            delivery.redelivered,
            delivery.message_id,
            self.broker_url,
            self.log,
            envelope.span,
            config=self.config,
        )
        event = envelope.event
        assert event is not None  # the decode layer ran
        if self.is_async:
            result = await self.handler(event, ctx)  # type: ignore[misc]
        else:
            loop = asyncio.get_running_loop()
            call = functools.partial(self.handler, event, ctx)
            # copy_context: the consumer span stays current inside the worker thread.
            result = await loop.run_in_executor(self.executor, contextvars.copy_context().run, call)
        self.stats.processed += 1
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

    def start(self, count: int) -> None:
        for _ in range(count):
            worker = max(self.workers, default=0) + 1
            self.workers[worker] = asyncio.create_task(self._supervised(worker), name=f"{self.name}#{worker}")
        self.stats.consumers = len(self.workers)
        self.stats.max_consumers = max(self.stats.max_consumers, self.stats.consumers)

    async def _supervised(self, worker: int) -> None:
        """Run one worker; an unexpected crash (not a handler error) restarts it with back-off."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            started = loop.time()
            try:
                await self._work(worker)
                return
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException as exc:  # SystemExit from a handler too: that worker died
                subscription = self.subscriptions.pop(worker, None)
                if subscription is not None:
                    await subscription.close()  # what it held goes back to the queue
                if loop.time() - started > _HEALTHY_AFTER:
                    failures = 0  # a worker that ran well for a while starts its back-off afresh
                delay = _RESTART_BACKOFF[min(failures, len(_RESTART_BACKOFF) - 1)]
                failures += 1
                self.stats.restarts += 1
                self.log.error(
                    "%s worker %d crashed (%s); restarting in %.1fs", self.name, worker, describe(exc), delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _work(self, worker: int) -> None:
        subscription = await self.broker.consume(self.queue, prefetch=self.prefetch)
        self.subscriptions[worker] = subscription
        if self._stopping.is_set():  # drain began while this worker was (re)starting
            return
        stats = self.stats
        process = self._process
        async for delivery in subscription:
            attempt = delivery.headers.get(ATTEMPT, 1)
            envelope = Envelope(delivery, worker, attempt if isinstance(attempt, int) else 1)
            stats.in_flight += 1
            stats.received += 1
            try:
                await process(envelope)
            finally:
                stats.in_flight -= 1
                if self.mirror is not None:
                    self.mirror()

    def held(self) -> int:
        """Deliveries this service holds unsettled: the broker counts them as unacknowledged."""
        return sum(sub.held for sub in self.subscriptions.values())

    async def drain(self) -> None:
        """Stop taking deliveries, let in-flight calls finish and acknowledge, flush retries."""
        self._stopping.set()
        for subscription in list(self.subscriptions.values()):
            await subscription.cancel()
        if self.workers:
            await asyncio.gather(*self.workers.values(), return_exceptions=True)
        await self.retries.flush()
        for subscription in self.subscriptions.values():
            await subscription.close()  # nothing should be left; whatever is goes back, marked
        self.subscriptions.clear()
        self.workers.clear()
        self.stats.consumers = 0
