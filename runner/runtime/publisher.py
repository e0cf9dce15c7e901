"""Turning an event into a traced, persistent message on a broker: the one way edarun publishes."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from itertools import count
from typing import Any

import orjson

from ..brokers import Broker, Message, spread_key
from ..patterns.priority import PRIORITY, STANDARD, LaneRule, Sequencer
from ..telemetry import Tracing
from ..types import lookup

ATTEMPT = "x-edarun-attempt"
log = logging.getLogger("edarun.publish")
# The span attributes of each lane (read-only: shared by every publish).
_ON_PRIORITY: dict[str, object] = {"edarun.lane": PRIORITY}
_ON_STANDARD: dict[str, object] = {"edarun.lane": STANDARD}


class PublishError(RuntimeError):
    """An event that could not be published (unroutable, not JSON-serialisable, broker error)."""


class Publisher:
    def __init__(
        self,
        broker: Broker,
        tracing: Tracing,
        *,
        service: str,
        lanes: Mapping[str, LaneRule] | None = None,
    ) -> None:
        self.broker = broker
        self.tracing = tracing
        self.service = service
        self.lanes = lanes or {}  # queue → its priority lane rule (pattern 3)
        # Unique without a uuid4 per message: a per-process random prefix and a counter.
        self._prefix = os.urandom(6).hex() + "-"
        self._ids = count(1)
        self._sequencers: dict[str, Sequencer] = {}
        self._unlaned: set[str] = set()
        # Pattern 9: the field a multi-broker spreads by, read here from the event rather than
        # decoded again from the body; with several brokers, the span says which one took it.
        self._spread_by = broker.spread_by
        self._several = len(broker.urls) > 1

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
        attributes: dict[str, object] | None = None,
    ) -> str:
        """Publish one event and return its message id once the broker has confirmed it.

        `priority` marks the event for the queue's priority lane; a queue without one takes it as a
        standard event, with a warning.
        """
        try:
            body = orjson.dumps(event)
        except TypeError as exc:
            raise PublishError(f"event for {queue!r} is not JSON-serialisable: {exc}") from None
        message_id = message_id or self._prefix + str(next(self._ids))
        headers = {} if headers is None else headers
        extra, attributes = attributes, None
        if self.lanes and (rule := self.lanes.get(queue)) is not None:
            if rule.order_by is not None:
                queue, attributes = self._lane(rule, event, priority, headers)
            elif priority or ((holds := rule.holds) is not None and holds(event)):
                queue, attributes = rule.lane, _ON_PRIORITY
            else:
                attributes = _ON_STANDARD
        elif priority and queue not in self._unlaned:
            self._unlaned.add(queue)  # delivered on the standard queue, said once
            log.warning(
                "%s: events marked priority for %r go to its standard queue: it has no priority lane "
                "(set priority_lane on its consumer)", self.service, queue,
            )  # fmt: skip
        key = spread_key(event, self._spread_by) if self._spread_by is not None else None
        if self.tracing.enabled:
            if extra:
                attributes = {**(attributes or {}), **extra}
            await self.send(
                queue, body, message_id, headers, root=root, persistent=persistent, attributes=attributes,
                key=key,
            )  # fmt: skip
        else:  # the hot path without tracing: one call less per event
            await self.broker.publish(queue, Message(body, message_id, headers, persistent, key))
        return message_id

    def _lane(
        self, rule: LaneRule, event: dict[str, Any], marked: bool, headers: dict[str, Any]
    ) -> tuple[str, dict[str, object]]:
        """The queue of the event's lane on an ordered queue, and its sequence headers
        (patterns.priority)."""
        priority = rule.is_priority(event, marked)
        if rule.order_by is not None:
            context = lookup(event, rule.order_by)
            # As the consumer's dispatcher: only a string, number or boolean is a context.
            if isinstance(context, str | int | float | bool):
                sequencer = self._sequencers.get(rule.queue)
                if sequencer is None:
                    sequencer = self._sequencers[rule.queue] = Sequencer(self._prefix.rstrip("-"))
                sequencer.stamp(context, PRIORITY if priority else STANDARD, headers)
        return (rule.lane, _ON_PRIORITY) if priority else (rule.queue, _ON_STANDARD)

    async def send(
        self,
        queue: str,
        body: bytes,
        message_id: str,
        headers: dict[str, Any],
        *,
        root: bool = False,
        persistent: bool = True,
        attributes: dict[str, object] | None = None,
        key: bytes | None = None,
    ) -> None:
        """Publish an encoded body in a PRODUCER span; returns once the broker confirmed it. `key`
        is the event's spread key, when the broker asks for one (without it, it reads the body)."""
        message = Message(body, message_id, headers, persistent, key)
        tracing = self.tracing
        if not tracing.enabled:
            await self.broker.publish(queue, message)
            return
        with tracing.publish_span(
            queue,
            message_id=message_id,
            headers=headers,
            system=self.broker.system,
            root=root,
            attributes=attributes,
        ) as span:
            taken_by = await self.broker.publish(queue, message)
            if self._several and span is not None:
                span.set_attribute("edarun.broker", taken_by)
