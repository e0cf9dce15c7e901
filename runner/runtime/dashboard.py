"""The dashboard: where every event edarun gives up on is parked, with the reason, never dropped.

Each consumer has its own dashboard queue (`<consumer>.dashboard`); a parked message keeps the original
body (even one that does not decode) and headers, plus why, where and after how many attempts.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..brokers import Delivery
from .publisher import Publisher
from .stats import ConsumerStats

ERROR = "x-edarun-error"
CONSUMER = "x-edarun-consumer"
QUEUE = "x-edarun-queue"
ATTEMPTS = "x-edarun-attempts"
PARKED_AT = "x-edarun-parked-at"


def dashboard_queue(consumer: str) -> str:
    return f"{consumer}.dashboard"


def parked_record(message_id: str, headers: dict[str, Any], body: bytes) -> dict[str, Any]:
    """A parked message as `dashboard list --json` shows it."""
    try:
        event: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = body.decode("utf-8", errors="replace")
    return {
        "id": message_id,
        "queue": headers.get(QUEUE),
        "consumer": headers.get(CONSUMER),
        "error": headers.get(ERROR),
        "attempts": headers.get(ATTEMPTS),
        "parked_at": _seconds(headers.get(PARKED_AT)),
        "event": event,
    }


def _seconds(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Dashboard:
    def __init__(
        self, publisher: Publisher, consumer: str, stats: ConsumerStats, sink: list[dict[str, Any]]
    ) -> None:
        self.publisher = publisher
        self.consumer = consumer
        self.queue = dashboard_queue(consumer)
        self.stats = stats
        self.sink = sink  # the run's record of parked events, for the report

    async def park(
        self,
        delivery: Delivery,
        error: str,
        attempts: int,
        message_id: str,
        *,
        ack: bool = True,
        queue: str | None = None,
    ) -> None:
        """Store the delivery durably in the dashboard, then acknowledge the original. `queue` is
        where the event was headed, when that is not the queue it came from (a workflow queue)."""
        headers = {
            **delivery.headers,  # a traced publish writes its own traceparent over the old one
            ERROR: error,
            CONSUMER: self.consumer,
            QUEUE: queue or delivery.queue,
            ATTEMPTS: attempts,
            PARKED_AT: f"{time.time():.3f}",  # text: AMQP would carry a float in 32 bits
        }
        # Published inside the failed call's span: the parking is the last step of the event's trace.
        await self.publisher.send(self.queue, delivery.body, message_id, headers)
        if ack:
            await delivery.ack()
        self.stats.parked += 1
        self.sink.append(parked_record(message_id, headers, delivery.body))
