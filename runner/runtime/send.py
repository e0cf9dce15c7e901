"""`edarun send`: one event into a queue of a pipeline's broker, as a new trace (with several
brokers, on the one a producer's publish of it would choose)."""

from __future__ import annotations

from typing import Any

from ..config.loader import LoadedPipeline
from ..config.models import is_memory
from ..patterns.priority import lane_rules
from ..telemetry import Tracing
from . import loop as event_loop
from .app import EXIT_INVALID, RunError, broker_urls, connect, queues_of
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
    if any(is_memory(url) for url in broker_urls(loaded, broker_url)):
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
    broker = await connect(loaded, broker_url, timeout)
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
