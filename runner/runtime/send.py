"""`edarun send`: one event into a queue of a pipeline's broker, as a new trace."""

from __future__ import annotations

import asyncio
from typing import Any

from ..brokers import BrokerError, connect_url
from ..config.loader import LoadedPipeline
from ..patterns.priority import lane_rules
from ..redact import redact_text, redact_url
from ..telemetry import Tracing
from . import loop as event_loop
from .app import EXIT_FAILURE, EXIT_INVALID, RunError, queue_types, queues_of
from .publisher import Publisher


async def send(
    loaded: LoadedPipeline,
    queue: str,
    event: dict[str, Any],
    broker_url: str | None,
    timeout: float,
    *,
    priority: bool = False,
) -> tuple[str, str]:
    url = broker_url or loaded.model.broker
    if url == "memory":
        raise RunError(
            "the memory broker lives inside one `edarun up` process; `send` needs a broker it can "
            "reach (--broker amqp://… or broker: in the pipeline)",
            EXIT_INVALID,
        )
    if queue not in queues_of(loaded):
        raise RunError(f"queue {queue!r} is not named in {loaded.path}", EXIT_INVALID)
    lanes = lane_rules(loaded.model)
    rule = lanes.get(queue)
    if priority and rule is None:
        raise RunError(f"queue {queue!r} has no priority lane: no consumer of it sets one", EXIT_INVALID)
    broker = connect_url(url, queue_types=queue_types(loaded))
    try:
        await asyncio.wait_for(broker.connect(timeout), timeout)
    except (TimeoutError, BrokerError, OSError) as exc:
        raise RunError(
            f"cannot reach broker {redact_url(url)}: {redact_text(str(exc)) or 'timed out'}",
            EXIT_FAILURE,
        ) from None
    tracing = Tracing()
    lanes = lane_rules(loaded.model)
    rule = lanes.get(queue)
    if priority and rule is None:
        raise RunError(
            f"queue {queue!r} has no priority lane (no consumer of it sets priority_lane)", EXIT_INVALID
        )
    target = rule.lane if rule is not None and rule.is_priority(event, priority) else queue
    try:
        await broker.declare(target)
        publisher = Publisher(broker, tracing, service="edarun-send", lanes=lanes)
        return await publisher.publish(queue, event, root=True, priority=priority), target
    finally:
        await broker.close()


def send_event(
    loaded: LoadedPipeline,
    queue: str,
    event: dict[str, Any],
    broker_url: str | None,
    timeout: float,
    *,
    priority: bool = False,
) -> tuple[str, str]:
    """Publish one event to a queue of a pipeline's broker; returns its message id and the queue
    it went to (the queue's priority lane for a priority event)."""
    return event_loop.run(send(loaded, queue, event, broker_url, timeout, priority=priority))
