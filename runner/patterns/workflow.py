"""Workflow event (pattern 7): `on_error: workflow(module:fn) [attempts N]` repairs failed events.

A consumer whose handler fails sends the event, with its error (type, message, consumer, attempt,
first failure), to its workflow queue `<consumer>.workflow` and acknowledges the original
(`WorkflowSender`). The workflow processor, a service of its own named like its queue (its own OS
process on RabbitMQ, like every service), calls the repair function
`repair(event, error, ctx) -> dict | None`:

- a dict is the corrected event: published to the consumer's queue with `attempt` + 1 (so the
  queue's priority lane rule applies to it as to any event), counted as `repaired`; what the
  repair published with `ctx.publish` goes out first;
- None, an exception, or an event that failed again after N repairs: parked in the consumer's
  dashboard queue with every error it met. Nothing is dropped.

Every step happens inside the spans of the event's own trace: the failed CONSUMER span publishes to
the workflow queue, the processor's CONSUMER span publishes the corrected event, whose CONSUMER
span ends the journey. `edarun dashboard` (`runtime.dashboard_admin`) lists, resubmits and drops
what was parked, from a durable queue, after the run.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import orjson

from ..brokers import Broker, BrokerError
from ..config.models import OnError
from ..runtime.context import Context
from ..runtime.dashboard import ATTEMPTS, CONSUMER, ERROR, QUEUE, Dashboard
from ..runtime.failures import Retries, describe
from ..runtime.pool import IndependentWorkers, PoolSettings
from ..runtime.publisher import ATTEMPT, Publisher, PublishError
from ..runtime.stats import ConsumerStats
from ..telemetry import Tracing
from ..types import Envelope

ERROR_TYPE = "x-edarun-error-type"
FIRST_FAILURE = "x-edarun-first-failure"
REPAIRS = "x-edarun-repairs"  # repairs this event has had so far
HISTORY = "x-edarun-errors"  # every error of the event so far, one per line
# Headers of the failure itself: the corrected event does not carry them on.
_FAILURE = (ERROR, ERROR_TYPE, CONSUMER, QUEUE, ATTEMPTS, "traceparent", "tracestate")
# An ordered lane's numbering (patterns.priority) belongs to the first publish, not to a resubmission.
_SEQUENCED = ("x-edarun-seq", "x-edarun-after")

Republish = Callable[[str, bytes, str, dict[str, Any]], Any]


def workflow_queue(consumer: str) -> str:
    return f"{consumer}.workflow"


def failure_headers(
    headers: Mapping[str, Any], error: BaseException, *, consumer: str, queue: str, attempt: int
) -> dict[str, Any]:
    """The headers of a failed event on its way to the workflow queue."""
    text = describe(error)
    history = headers.get(HISTORY)
    history_text = history.decode() if isinstance(history, bytes) else history
    out = dict(headers)  # a traced publish writes its own traceparent over the old one
    out.update({
        ERROR: text,
        ERROR_TYPE: type(error).__name__,
        CONSUMER: consumer,
        QUEUE: queue,
        ATTEMPT: attempt,
        # Text: AMQP carries a float header as 32 bits, which rounds today's time to 2 minutes.
        FIRST_FAILURE: headers.get(FIRST_FAILURE) or f"{time.time():.3f}",
        HISTORY: f"{history_text}\n{text}" if history_text else text,
    })  # fmt: skip
    return out


class WorkflowSender:
    """The consumer's side: hands a failed event over to the workflow queue (on_error's layer)."""

    def __init__(self, consumer: str, publisher: Publisher, dashboard: Dashboard) -> None:
        self.consumer = consumer
        self.inbox = workflow_queue(consumer)
        self.publisher = publisher
        self.dashboard = dashboard
        self.log = logging.getLogger(f"edarun.{consumer}")

    async def __call__(self, envelope: Envelope, failure: BaseException, acked: bool) -> None:
        """The consumer's on_error layer hands a failed event over: to the workflow queue, with its
        error, inside the failed call's span; then the original is acknowledged."""
        delivery = envelope.delivery
        headers = failure_headers(
            delivery.headers, failure, consumer=self.consumer, queue=delivery.queue, attempt=envelope.attempt
        )
        try:
            await self.publisher.send(self.inbox, delivery.body, delivery.message_id, headers)
        except Exception as exc:
            # The broker refused it for good (a connection problem is retried inside publish):
            # parked, not requeued, which would fail the same way again and again.
            self.log.warning("%s: %s not sent to the workflow (%s)", self.consumer, delivery.message_id, exc)
            error = f"{describe(failure)}; not sent to the workflow: {exc}"
            await self.dashboard.park(delivery, error, envelope.attempt, delivery.message_id, ack=not acked)
            return
        if not acked:
            await delivery.ack()


class WorkflowProcessor:
    """The repair service of one consumer: reads `<consumer>.workflow`, repairs or parks.

    A service of its own (`<consumer>.workflow`; its own OS process on RabbitMQ), with the interface
    the runner watches a consumer by: `stats`, `held`, `in_flight`, `retries`, `start`, `drain`.
    """

    def __init__(
        self,
        consumer: str,
        policy: OnError,
        *,
        repair: Callable[..., Any],
        queue: str,
        broker: Broker,
        tracing: Tracing,
        publisher: Publisher,
        dashboard: Dashboard,
        stats: ConsumerStats,
        executor: Executor,
    ) -> None:
        self.consumer = consumer
        self.policy = policy
        self.repair = repair
        self.is_async = inspect.iscoroutinefunction(repair)
        self.queue = queue  # the consumer's queue: where a corrected event goes
        self.inbox = workflow_queue(consumer)
        self.broker = broker
        self.tracing = tracing
        self.publisher = publisher
        self.dashboard = dashboard
        self.name = workflow_queue(consumer)
        self.stats = stats  # the consumer's: `repaired` and `parked` are counted there
        self.retries = Retries()  # none: the interface the runner watches services by
        self.executor = executor
        self.log = logging.getLogger(f"edarun.{consumer}.workflow")
        # The pool's own counters (deliveries, workers), apart from the consumer's.
        self.pool_stats = ConsumerStats()
        self.pool = IndependentWorkers(
            PoolSettings(
                name=f"{consumer} workflow",
                queue=self.inbox,
                broker=broker,
                prefetch=10,
                process=self._process,
                stats=self.pool_stats,
                after_each=self._after_each,
            )
        )
        # Called after each delivery, before its acknowledgement leaves (runtime.counters).
        self.mirror: Callable[[], None] | None = None
        self._restarts_seen = 0

    def start(self, count: int = 1, *, instances: int = 1) -> None:
        self.pool.start(1)

    def _after_each(self) -> None:
        if self.mirror is not None:
            self.mirror()

    def held(self) -> int:
        # The runner asks every poll: the moment to carry the pool's restarts (a repair that took
        # its worker down) over to the consumer's counts, where the report shows them.
        self._sync_restarts()
        return self.pool.held()

    def _sync_restarts(self) -> None:
        new = self.pool_stats.restarts - self._restarts_seen
        if new:
            self.stats.restarts += new
            self._restarts_seen += new

    @property
    def in_flight(self) -> int:
        return self.pool_stats.in_flight

    async def drain(self) -> None:
        await self.pool.drain()
        await self.pool.close()
        self._sync_restarts()

    async def _process(self, envelope: Envelope) -> None:
        delivery = envelope.delivery
        headers = delivery.headers
        attempt = headers.get(ATTEMPT, 1)
        attempt = attempt if isinstance(attempt, int) else 1
        attributes: dict[str, object] = {
            "edarun.consumer": f"{self.consumer}.workflow",
            "edarun.attempt": attempt,
        }
        with self.tracing.consume_span(
            delivery.queue,
            message_id=delivery.message_id,
            headers=headers,
            system=self.broker.system,
            attributes=attributes,
        ) as span:
            envelope.span = span
            await self._repair_or_park(envelope, attempt)

    async def _repair_or_park(self, envelope: Envelope, attempt: int) -> None:
        delivery = envelope.delivery
        headers = delivery.headers
        error = _text(headers.get(ERROR)) or "unknown error"
        origin = _text(headers.get(QUEUE)) or self.queue
        repairs = headers.get(REPAIRS, 0)
        repairs = repairs if isinstance(repairs, int) else 0
        try:
            event = orjson.loads(delivery.body)
            if not isinstance(event, dict):
                raise ValueError(f"expected a JSON object, got {type(event).__name__}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            await self._park(envelope, f"{error}; and the body does not decode: {exc}", attempt, origin)
            return
        if repairs >= self.policy.attempts:
            await self._park(envelope, f"{error} (after {repairs} repairs)", attempt, origin)
            return
        ctx = Context(
            origin, self.consumer, envelope.worker, attempt, delivery.redelivered, delivery.message_id,
            delivery.broker, self.log, envelope.span,
        )  # fmt: skip
        try:
            if self.is_async:
                result = await self.repair(event, error, ctx)
            else:
                call = functools.partial(self.repair, event, error, ctx)
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.executor, contextvars.copy_context().run, call)
        except Exception as exc:
            await self._park(envelope, f"{error}; the repair failed too: {describe(exc)}", attempt, origin)
            return
        if result is not None and not isinstance(result, dict):
            kind = type(result).__name__
            await self._park(envelope, f"{error}; the repair returned {kind}, not a dict", attempt, origin)
            return
        try:
            # Encoded before anything goes out: an event the broker cannot take is parked whole,
            # never half published and never retried in a loop.
            if result is not None:
                orjson.dumps(result)
            for queue, out_event, priority in ctx.outbox:  # what the repair published, as a handler's
                await self.publisher.publish(queue, out_event, priority=priority)
            if result is None:
                await self._park(envelope, f"{error}; the repair gave up", attempt, origin)
                return
            out = {k: v for k, v in headers.items() if k not in _FAILURE and k not in _SEQUENCED}
            out[ATTEMPT] = attempt + 1
            out[REPAIRS] = repairs + 1
            self._decided(envelope, "resubmit")
            # To the consumer's queue, whichever lane it failed on: the lane rule decides again.
            # A new message id: the corrected event is a new message of the same trace.
            await self.publisher.publish(
                self.queue, result, message_id=f"{delivery.message_id}.r{repairs + 1}", headers=out
            )
        except (PublishError, BrokerError, TypeError) as exc:
            await self._park(
                envelope, f"{error}; the repair's result was not published: {exc}", attempt, origin
            )
            return
        self.stats.repaired += 1
        await envelope.ack()
        self.log.info(
            "%s: event %s repaired; resubmitted as attempt %d",
            self.consumer,
            delivery.message_id,
            attempt + 1,
        )

    async def _park(self, envelope: Envelope, error: str, attempt: int, origin: str) -> None:
        self._decided(envelope, "park")
        delivery = envelope.delivery
        self.log.warning("%s: event %s parked: %s", self.consumer, delivery.message_id, error)
        envelope.settled = True
        await self.dashboard.park(delivery, error, attempt, delivery.message_id, queue=origin)

    def _decided(self, envelope: Envelope, action: str) -> None:
        span = envelope.span
        if span is not None and span.is_recording():
            span.set_attribute("edarun.workflow.action", action)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None
