"""The broker protocol: the few async operations every pattern needs, on any broker.

`memory`, `amqp` and multi-broker implement it; patterns and the runtime see nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


@dataclass(slots=True)
class Message:
    """An outgoing message: a JSON body plus headers (trace context, attempt, edarun metadata)."""

    body: bytes
    message_id: str
    headers: dict[str, Any] = field(default_factory=dict)
    persistent: bool = True
    # The spread key of a multi-broker with `spread: by_context` (see `spread_key`), when the
    # publisher was asked for it (`Broker.spread_by`); None: not given, the broker reads the body.
    key: bytes | None = None
    # Messages with the same pin stay on one broker of a multi-broker, whatever the spread: a
    # line of control messages (pattern 4's versions) that must not overtake one another.
    pin: bytes | None = None


class Delivery(Protocol):
    """An incoming message, unacknowledged until `ack` or `nack` is awaited."""

    body: bytes
    message_id: str
    headers: dict[str, Any]
    redelivered: bool
    queue: str

    @property
    def broker(self) -> str:
        """The URL (credentials redacted) of the broker it came from."""

    @property
    def stale(self) -> bool:
        """True when it came on a connection that has since died: an ack would be dropped and the
        broker delivers it again, so it is not worth processing now."""

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool) -> None:
        """Requeue (redelivered later, marked) or drop it; callers park before dropping."""


@dataclass(frozen=True, slots=True)
class Depth:
    """Ready messages (the depth of the talk) and, separately, delivered but unacknowledged ones
    (on RabbitMQ, which does not report them over AMQP: those held by this process's consumers)."""

    ready: int
    unacked: int
    # False when a broker that may hold more of the queue did not answer (a multi-broker's member
    # that is down): the figures are a floor, and the queue cannot be taken for empty.
    complete: bool = True

    @property
    def total(self) -> int:
        return self.ready + self.unacked


class Subscription(Protocol):
    """One broker consumer: deliveries in queue order, at most `prefetch` unacknowledged."""

    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def __anext__(self) -> Delivery: ...

    @property
    def held(self) -> int:
        """Deliveries received and not yet acknowledged or rejected."""

    @property
    def ended(self) -> bool:
        """Cancelled, and nothing is left to hand out."""

    @property
    def generation(self) -> int:
        """Goes up when the deliveries handed out so far became stale (a reconnect): the broker
        delivers them again, and what a consumer concluded from them no longer holds."""

    def poll(self) -> Delivery | None:
        """The next delivery if one is here now, without waiting (the lanes of pattern 3 read two
        subscriptions this way, the priority lane first)."""

    def listen(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) when a delivery may have arrived or the subscription ended;
        `unlisten` removes it. Several listeners may wait on one subscription."""

    def unlisten(self, callback: Callable[[], None]) -> None: ...

    async def cancel(self) -> None:
        """Stop receiving; deliveries already handed out can still be acknowledged or requeued."""

    async def close(self) -> None:
        """Cancel, and return every unacknowledged delivery to the queue, marked redelivered."""


class BrokerError(RuntimeError):
    """A broker operation that failed (unreachable broker, unroutable message, closed connection)."""


class BrokerUnavailable(BrokerError):
    """The broker is down, or went down before it confirmed: a publish may or may not have been
    taken, so a multi-broker sends it to another broker (at-least-once: it may be on both)."""


class Broker(Protocol):
    url: str  # credentials redacted: safe to print, log and trace
    urls: tuple[str, ...]  # the brokers behind it, redacted: one, or a multi-broker's members
    system: str  # messaging.system of the spans
    publish_window: int  # publishes a producer may keep in flight awaiting their confirms
    # The event field a publisher should pass as `Message.key` (`spread_key`), or None.
    spread_by: str | None

    async def connect(self, timeout: float) -> None: ...

    async def declare(self, queue: str, *, expires: float | None = None) -> None:
        """Create the queue if missing (idempotent). With `expires` (seconds), the broker deletes
        it once it has gone unused that long (no consumer, no declare): a queue of a service that
        may never come back. Every declare of a queue must say the same."""

    async def publish(self, queue: str, message: Message) -> str:
        """Returns once the broker has taken responsibility (a publisher confirm on RabbitMQ): the
        URL (redacted) of the broker that took it."""

    async def consume(self, queue: str, *, prefetch: int) -> Subscription: ...

    async def depth(self, queue: str) -> Depth: ...

    async def broadcast(self, exchange: str, message: Message) -> None:
        """Publish to every listener of `exchange` (a fanout exchange, made if missing); confirmed.
        A message nobody listens to is dropped by design: it is a notice, not an event."""

    async def listen(self, exchange: str) -> Subscription:
        """A queue of this listener's own, bound to `exchange`, gone when the listener is (pattern 8's
        control messages: one queue per producer, not one shared queue)."""

    async def close(self) -> None: ...


def spread_key(event: dict[str, Any], field: str) -> bytes:
    """The spread key of an event (pattern 9): the JSON of its value at the dotted `field`, or b""
    when it has none to keep together (missing, or not a string, number or boolean)."""
    value: Any = event
    for part in field.split("."):
        if not isinstance(value, dict):
            return b""
        value = value.get(part)
    if isinstance(value, str | int | float | bool):
        return orjson.dumps(value)
    return b""
