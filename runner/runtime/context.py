"""`ctx`, the second argument of every handler: where the event came from and what it may do."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

EMPTY_CONFIG: Mapping[str, Any] = MappingProxyType({})


class Context:
    """Per-call facts (SPEC §2) plus `publish`, which the runtime flushes after the handler returns.

    Publishing after the handler returned and before the acknowledgement means an event that fails is
    never half-published, and a sync handler in a worker thread never touches the event loop.
    """

    __slots__ = (
        "attempt", "broker", "config", "consumer", "context", "lane", "log", "message_id",
        "outbox", "queue", "redelivered", "span", "worker",
    )  # fmt: skip

    def __init__(
        self,
        queue: str,
        consumer: str,
        worker: int,
        attempt: int,
        redelivered: bool,
        message_id: str,
        broker: str,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        span: Any = None,
        *,
        context: Any = None,
        lane: str = "standard",
        config: Mapping[str, Any] = EMPTY_CONFIG,
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.worker = worker
        self.attempt = attempt
        self.redelivered = redelivered
        self.message_id = message_id
        self.broker = broker
        self.log = log
        self.span = span
        self.context = context
        self.lane = lane
        self.config = config
        self.outbox: list[tuple[str, dict[str, Any], bool]] = []

    def publish(self, queue: str, event: dict[str, Any], *, priority: bool = False) -> None:
        """Publish `event` to `queue` once this handler call has returned successfully."""
        if not isinstance(event, dict):
            raise TypeError(f"ctx.publish expects a dict event, got {type(event).__name__}")
        self.outbox.append((queue, event, priority))

    def __repr__(self) -> str:
        return (
            f"<ctx {self.consumer} worker={self.worker} queue={self.queue} "
            f"message_id={self.message_id} attempt={self.attempt}>"
        )


class SourceContext:
    """The `ctx` a `module:function` source may take: who is producing, and a logger."""

    __slots__ = ("config", "log", "producer")

    def __init__(self, producer: str, log: logging.Logger, config: Mapping[str, Any] = EMPTY_CONFIG) -> None:
        self.producer = producer
        self.log = log
        self.config = config
