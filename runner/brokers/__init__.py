"""Brokers: one protocol (`base.Broker`), an embedded implementation and RabbitMQ behind it, and a
multi-broker that holds several of either (pattern 9)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Broker, BrokerError, BrokerUnavailable, Delivery, Depth, Message, Subscription, spread_key
from .memory import MemoryBroker

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Delivery",
    "Depth",
    "Message",
    "Subscription",
    "connect_url",
    "connect_urls",
    "spread_key",
]


def connect_url(url: str, *, queue_types: dict[str, str] | None = None, failover: bool = False) -> Broker:
    """The broker for a pipeline's `broker:` URL (not yet connected). `failover`: as a member of a
    multi-broker, which turns to another broker instead of waiting for this one to come back."""
    if url == "memory" or url.startswith("memory://"):
        return MemoryBroker(url)
    if url.startswith(("amqp://", "amqps://")):
        from .amqp import AmqpBroker  # aio-pika is imported only by pipelines that use it

        return AmqpBroker(url, queue_types=queue_types, failover=failover)
    raise BrokerError(f"broker {url.split('://')[0]}:// is not supported")


def connect_urls(
    urls: Sequence[str], *, spread_by: str | None = None, queue_types: dict[str, str] | None = None
) -> Broker:
    """The broker for a pipeline's brokers (not yet connected): one, or a multi-broker over several
    that spreads publishes by the `spread_by` field's value (None: round robin)."""
    if len(urls) == 1:
        return connect_url(urls[0], queue_types=queue_types)
    from .multi import MultiBroker

    members = [connect_url(url, queue_types=queue_types, failover=True) for url in urls]
    return MultiBroker(members, spread_by=spread_by)  # type: ignore[arg-type]
