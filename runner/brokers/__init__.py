"""Brokers: one protocol (`base.Broker`), an embedded implementation and RabbitMQ behind it."""

from __future__ import annotations

from .base import Broker, BrokerError, Delivery, Depth, Message, Subscription
from .memory import MemoryBroker

__all__ = ["Broker", "BrokerError", "Delivery", "Depth", "Message", "Subscription", "connect_url"]


def connect_url(url: str) -> Broker:
    """The broker for a pipeline's `broker:` URL (not yet connected)."""
    if url == "memory":
        return MemoryBroker()
    raise BrokerError(f"broker {url.split('://')[0]}:// is not supported by this version of edarun")
