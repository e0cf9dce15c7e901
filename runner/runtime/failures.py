"""The default error policies: `retry(N)` with exponential back-off, then parked; `dead_letter`.

A retry is a copy of the event published back to the consumer's queue with `attempt` + 1 after the
back-off; the failed delivery stays unacknowledged until that copy is confirmed, so a crash during
the back-off redelivers it instead of losing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..config.models import OnError
from ..telemetry import Tracing
from ..types import CallNext, Envelope, Layer
from .dashboard import Dashboard
from .publisher import ATTEMPT
from .stats import ConsumerStats

log = logging.getLogger("edarun.consumer")


def describe(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Retries:
    """Back-off timers owned by one consumer; `flush` on drain republishes them at once."""

    def __init__(self) -> None:
        self.pending: set[asyncio.Task[None]] = set()
        self.draining = asyncio.Event()

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def wait(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.draining.wait(), delay)

    async def flush(self) -> None:
        self.draining.set()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


Republish = Callable[[str, bytes, str, dict[str, Any]], Awaitable[None]]
# Pattern 7: hands a failed event (envelope, error, already acknowledged?) to the workflow processor.
ToWorkflow = Callable[[Envelope, BaseException, bool], Awaitable[None]]


class RetryInPlace(Exception):
    """Raised to an ordered worker: run this delivery again after `delay`, keeping its place.

    A copy republished to the queue would land behind later events of its context; an ordered
    consumer instead holds the delivery (unacknowledged) and blocks only its own context.
    """

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


def on_error(
    current: Callable[[], OnError],
    *,
    dashboard: Dashboard,
    stats: ConsumerStats,
    retries: Retries,
    tracing: Tracing,
    republish: Republish,
    in_place: bool = False,
    workflow: ToWorkflow | None = None,
) -> Layer:
    """The layer that turns a handler failure into a retry or a parked event. `current` gives the
    policy at the time of each failure: `edarun up --reload` may change its numbers."""

    async def retry_later(envelope: Envelope, delay: float, acked: bool) -> None:
        await retries.wait(delay)
        delivery = envelope.delivery
        headers = {k: v for k, v in delivery.headers.items() if k not in ("traceparent", "tracestate")}
        headers[ATTEMPT] = envelope.attempt + 1
        try:
            await republish(delivery.queue, delivery.body, delivery.message_id, headers)
        except Exception as exc:
            # The broker refused the copy for good (a connection problem is retried inside
            # publish): parked, not requeued, which would fail the same way again and again.
            log.warning("%s: retry of %s not published (%s)", dashboard.consumer, delivery.message_id, exc)
            error = f"retry not published: {exc}"
            await dashboard.park(delivery, error, envelope.attempt, delivery.message_id, ack=not acked)
            return
        if not acked:
            await delivery.ack()

    async def handle_failure(envelope: Envelope, call_next: CallNext) -> None:
        try:
            await call_next(envelope)
            return
        except Exception as exc:
            failure = exc
        error = describe(failure)
        policy = current()
        stats.failed += 1
        envelope.failed = True
        attempt = envelope.attempt
        delivery = envelope.delivery
        if policy.action == "retry" and attempt <= policy.retries:
            stats.retried += 1
            delay = min(policy.backoff * 2 ** (attempt - 1), policy.max_backoff)
            tracing.failed(envelope.span, failure, {"edarun.workflow.action": "retry"})
            log.debug(
                "%s: %s failed at attempt %d (%s); retry in %.2fs",
                dashboard.consumer, delivery.message_id, attempt, error, delay,
            )  # fmt: skip
            if in_place:
                raise RetryInPlace(delay)
            acked, envelope.settled = envelope.settled, True
            retries.start(retry_later(envelope, delay, acked))
            return
        if policy.action == "workflow":
            # Pattern 7: the event and its error go to the workflow processor (patterns.workflow).
            acked, envelope.settled = envelope.settled, True
            tracing.failed(envelope.span, failure, {"edarun.workflow.action": "workflow"})
            assert workflow is not None, "a workflow policy comes with its processor"
            await workflow(envelope, failure, acked)
            return
        acked, envelope.settled = envelope.settled, True
        tracing.failed(envelope.span, failure, {"edarun.workflow.action": "park"})
        log.warning(
            "%s: %s parked after %d attempt(s): %s", dashboard.consumer, delivery.message_id, attempt, error
        )
        await dashboard.park(delivery, error, attempt, delivery.message_id, ack=not acked)

    return handle_failure
