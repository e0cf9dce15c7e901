"""Brokers: one protocol (`base.Broker`), an embedded implementation and RabbitMQ behind it."""

from __future__ import annotations

from .base import Broker, BrokerError, Delivery, Depth, Message, Subscription
from .memory import MemoryBroker

__all__ = ["Broker", "BrokerError", "Delivery", "Depth", "Message", "Subscription", "connect_url"]


def connect_url(url: str, *, queue_types: dict[str, str] | None = None) -> Broker:
    """The broker for a pipeline's `broker:` URL (not yet connected)."""
    if url == "memory":
        return MemoryBroker()
    if url.startswith(("amqp://", "amqps://")):
        from .amqp import AmqpBroker  # aio-pika is imported only by pipelines that use it

        return AmqpBroker(url, queue_types=queue_types)
    raise BrokerError(f"broker {url.split('://')[0]}:// is not supported")
