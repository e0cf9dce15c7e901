"""A producer service: pulls its source lazily, paces it, and publishes each event as a new trace."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ..brokers import Broker, BrokerError
from ..config.models import Producer
from ..telemetry import Tracing
from .context import SourceContext
from .publisher import Publisher, PublishError
from .sources import SourceError, open_source
from .stats import ProducerStats


class ProducerService:
    def __init__(
        self,
        name: str,
        spec: Producer,
        *,
        source_file: Path | None,
        source_function: Any,
        broker: Broker,
        tracing: Tracing,
        stats: ProducerStats,
    ) -> None:
        self.name = name
        self.spec = spec
        self.source_file = source_file
        self.source_function = source_function
        self.stats = stats
        self.log = logging.getLogger(f"edarun.{name}")
        self.publisher = Publisher(broker, tracing, service=name)
        self.stopping = asyncio.Event()

    def target(self, event: dict[str, Any]) -> str:
        assert self.spec.to is not None  # routing producers are refused before start
        return self.spec.to

    async def run(self) -> None:
        spec, stats = self.spec, self.stats
        loop = asyncio.get_running_loop()
        interval = 1.0 / spec.rate if spec.rate else 0.0
        next_at = loop.time()
        taken = 0
        publish = self.publisher.publish
        source = open_source(self.source_file, self.source_function, SourceContext(self.name, self.log))
        try:
            async for item in source:
                if self.stopping.is_set():
                    break
                taken += 1
                if isinstance(item, SourceError):
                    stats.rejected += 1
                    self.log.error("%s: event rejected: %s", self.name, item)
                else:
                    try:
                        await publish(self.target(item), item, root=True)
                    except (PublishError, BrokerError) as exc:
                        stats.rejected += 1
                        self.log.error("%s: publish failed: %s", self.name, exc)
                    else:
                        stats.published += 1
                if spec.count is not None and taken >= spec.count:
                    break
                if interval:
                    next_at += interval
                    delay = next_at - loop.time()
                    if delay > 0.001:  # below a millisecond, catch up instead of sleeping
                        await asyncio.sleep(delay)
        except SourceError as exc:
            self.log.error("%s: source failed: %s", self.name, exc)
            raise
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            stats.done = True
