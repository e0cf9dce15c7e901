"""Turning an event into a traced, persistent message on a broker: the one way edarun publishes."""

from __future__ import annotations

import os
from itertools import count
from typing import Any

import orjson

from ..brokers import Broker, Message
from ..telemetry import Tracing

ATTEMPT = "x-edarun-attempt"
PRIORITY = "x-edarun-priority"


class PublishError(RuntimeError):
    """An event that could not be published (unroutable, not JSON-serialisable, broker error)."""


class Publisher:
    def __init__(self, broker: Broker, tracing: Tracing, *, service: str) -> None:
        self.broker = broker
        self.tracing = tracing
        self.service = service
        # Unique without a uuid4 per message: a per-process random prefix and a counter.
        self._prefix = os.urandom(6).hex() + "-"
        self._ids = count(1)

    def new_id(self) -> str:
        return self._prefix + str(next(self._ids))

    async def publish(
        self,
        queue: str,
        event: dict[str, Any],
        *,
        root: bool = False,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        priority: bool = False,
        persistent: bool = True,
    ) -> str:
        """Publish one event and return its message id once the broker has confirmed it."""
        try:
            body = orjson.dumps(event)
        except TypeError as exc:
            raise PublishError(f"event for {queue!r} is not JSON-serialisable: {exc}") from None
        message_id = message_id or self._prefix + str(next(self._ids))
        headers = {} if headers is None else headers
        if priority:
            headers[PRIORITY] = True
        if self.tracing.enabled:
            await self.send(queue, body, message_id, headers, root=root, persistent=persistent)
        else:  # the hot path without tracing: one call less per event
            await self.broker.publish(queue, Message(body, message_id, headers, persistent))
        return message_id

    async def send(
        self,
        queue: str,
        body: bytes,
        message_id: str,
        headers: dict[str, Any],
        *,
        root: bool = False,
        persistent: bool = True,
    ) -> None:
        """Publish an encoded body in a PRODUCER span; returns once the broker confirmed it."""
        message = Message(body=body, message_id=message_id, headers=headers, persistent=persistent)
        tracing = self.tracing
        if not tracing.enabled:
            await self.broker.publish(queue, message)
            return
        with tracing.publish_span(
            queue, message_id=message_id, headers=headers, system=self.broker.system, root=root
        ):
            await self.broker.publish(queue, message)
