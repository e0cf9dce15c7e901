"""`edarun dashboard`: the parked events of a pipeline, read from its durable dashboard queues.

Every consumer parks what edarun gives up on in `<consumer>.dashboard` (runtime.dashboard). On
RabbitMQ these are durable queues, so they can be read after the run, from any machine: `list` and
`show` take every parked message without acknowledging it and give it back (nothing changes);
`resubmit` publishes the event (edited, with `--event`) to the queue it was headed for, with the
next attempt number and its trace context, and then removes it; `drop` removes one, and asks for
`--yes` first. With several brokers (pattern 9) each has its dashboard queues: they are read on
every broker, and a resubmitted event is spread as a producer's would be. The embedded `memory`
broker lives inside one `edarun up` process: there the dashboard is the report's `parked_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ..brokers import BrokerError
from ..config.loader import LoadedPipeline
from ..config.models import is_memory
from ..patterns.priority import AFTER, SEQUENCE, lane_rules
from ..patterns.workflow import ERROR_TYPE, HISTORY, REPAIRS
from ..redact import redact_text, redact_url
from ..telemetry import Tracing
from . import loop as event_loop
from .app import EXIT_FAILURE, EXIT_INVALID, RunError, broker_urls, connect
from .dashboard import ATTEMPTS, CONSUMER, ERROR, PARKED_AT, QUEUE, dashboard_queue, parked_record
from .publisher import ATTEMPT, Publisher

_NOT_CARRIED = {ERROR, ERROR_TYPE, CONSUMER, QUEUE, ATTEMPTS, PARKED_AT, HISTORY, REPAIRS, SEQUENCE, AFTER}


@dataclass
class Parked:
    message: AbstractIncomingMessage
    record: dict[str, Any]


Channels = list[tuple[str, aio_pika.abc.AbstractChannel]]  # (broker URL, a channel on it)


class DashboardAdmin:
    def __init__(self, loaded: LoadedPipeline, broker_url: str | None, timeout: float) -> None:
        self.loaded = loaded
        self.override = broker_url
        self.urls = broker_urls(loaded, broker_url)
        self.timeout = timeout
        if any(is_memory(url) for url in self.urls):
            raise RunError(
                "the memory broker lives inside one `edarun up` process: its parked events are in the "
                "report (`--report FILE`, parked_events); the dashboard commands need a broker they can "
                "reach (--broker amqp://… or broker: in the pipeline)",
                EXIT_INVALID,
            )
        self.connections: list[tuple[str, aio_pika.abc.AbstractConnection]] = []

    async def __aenter__(self) -> DashboardAdmin:
        # Every broker: an event parked on one that does not answer would be missing from the list.
        for url in self.urls:
            try:
                connection = await asyncio.wait_for(aio_pika.connect(url), self.timeout)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                await self.__aexit__()
                raise RunError(
                    f"cannot reach broker {redact_url(url)}: {redact_text(str(exc)) or 'timed out'}",
                    EXIT_FAILURE,
                ) from None
            self.connections.append((url, connection))
        return self

    async def __aexit__(self, *_: object) -> None:
        for _url, connection in self.connections:
            with contextlib.suppress(Exception):
                await connection.close()
        self.connections.clear()

    async def _channels(self) -> Channels:
        return [(url, await connection.channel()) for url, connection in self.connections]

    @staticmethod
    async def _close(channels: Channels) -> None:
        for _url, channel in channels:  # everything not acknowledged goes back, as it was
            with contextlib.suppress(Exception):
                await channel.close()

    async def take_all(self, channels: Channels) -> list[Parked]:
        """Every parked message of every consumer on every broker, unacknowledged: closing the
        channels gives back whatever is not acknowledged."""
        parked = []
        for url, channel in channels:
            parked += await self._take(channel, url if len(channels) > 1 else None)
        return parked

    async def _take(self, channel: aio_pika.abc.AbstractChannel, broker: str | None) -> list[Parked]:
        parked = []
        for consumer in self.loaded.model.consumers:
            try:
                queue = await channel.declare_queue(dashboard_queue(consumer), passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                await channel.reopen()  # a pipeline that never ran here: nothing parked
                continue
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                headers = dict(message.headers or {})
                record = parked_record(message.message_id or "", _text_headers(headers), message.body)
                record["consumer"] = record["consumer"] or consumer
                if broker is not None:
                    record["broker"] = redact_url(broker)  # where it is parked (pattern 9)
                parked.append(Parked(message, record))
        return parked

    async def records(self) -> list[dict[str, Any]]:
        channels = await self._channels()
        try:
            return [p.record for p in await self.take_all(channels)]
        finally:
            await self._close(channels)

    async def find(self, channels: Channels, message_id: str) -> Parked:
        for parked in await self.take_all(channels):
            if parked.record["id"] == message_id:
                return parked
        raise RunError(
            f"no parked event {message_id!r} in the dashboards of {self.loaded.path}", EXIT_INVALID
        )

    async def resubmit(self, message_id: str, event: dict[str, Any] | None) -> tuple[str, int]:
        channels = await self._channels()
        try:
            parked = await self.find(channels, message_id)
            record = parked.record
            body = event if event is not None else record["event"]
            if not isinstance(body, dict):
                raise RunError(
                    f"parked event {message_id!r} is not a JSON object; resubmit it with --event JSON",
                    EXIT_INVALID,
                )
            queue = record["queue"] or self.loaded.model.consumers[record["consumer"]].from_
            lanes = {rule.lane: name for name, rule in lane_rules(self.loaded.model).items()}
            queue = lanes.get(queue, queue)  # a priority event goes back through its lane's rule
            attempts = record["attempts"] if isinstance(record["attempts"], int) else 1
            headers = {k: v for k, v in (parked.message.headers or {}).items() if k not in _NOT_CARRIED}
            headers[ATTEMPT] = attempts + 1
            broker = await connect(self.loaded, self.override, self.timeout)
            try:
                publisher = Publisher(
                    broker, Tracing(), service="edarun-dashboard", lanes=lane_rules(self.loaded.model)
                )
                await publisher.publish(queue, body, message_id=message_id, headers=headers)
            except BrokerError as exc:
                raise RunError(f"resubmit {message_id!r}: {redact_text(str(exc))}", EXIT_FAILURE) from None
            finally:
                await broker.close()
            await parked.message.ack()  # only once the broker has the resubmitted event
            return queue, attempts + 1
        finally:
            await self._close(channels)

    async def drop(self, message_id: str) -> dict[str, Any]:
        channels = await self._channels()
        try:
            parked = await self.find(channels, message_id)
            await parked.message.ack()
            return parked.record
        finally:
            await self._close(channels)


def _text_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for k, v in headers.items()}


def run_admin(loaded: LoadedPipeline, broker_url: str | None, timeout: float, action: Any) -> Any:
    """Run `action(admin)` (a coroutine function) against the pipeline's dashboards."""

    async def go() -> Any:
        async with DashboardAdmin(loaded, broker_url, timeout) as admin:
            return await action(admin)

    return event_loop.run(go())
