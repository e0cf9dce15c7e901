"""`edarun dashboard`: the parked events of a pipeline, read from its durable dashboard queues.

Every consumer parks what edarun gives up on in `<consumer>.dashboard` (runtime.dashboard). On
RabbitMQ these are durable queues, so they can be read after the run, from any machine: `list` and
`show` take every parked message without acknowledging it and give it back (nothing changes);
`resubmit` publishes the event (edited, with `--event`) to the queue it was headed for, with the
next attempt number and its trace context, and then removes it; `drop` removes one, and asks for
`--yes` first. The embedded `memory` broker lives inside one `edarun up` process: there the
dashboard is the report's `parked_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ..brokers import BrokerError, connect_url
from ..config.loader import LoadedPipeline
from ..patterns.priority import AFTER, SEQUENCE, lane_rules
from ..patterns.workflow import ERROR_TYPE, HISTORY, REPAIRS
from ..redact import redact_text, redact_url
from ..telemetry import Tracing
from . import loop as event_loop
from .app import EXIT_FAILURE, EXIT_INVALID, RunError, queue_types
from .dashboard import ATTEMPTS, CONSUMER, ERROR, PARKED_AT, QUEUE, dashboard_queue, parked_record
from .publisher import ATTEMPT, Publisher

_NOT_CARRIED = {ERROR, ERROR_TYPE, CONSUMER, QUEUE, ATTEMPTS, PARKED_AT, HISTORY, REPAIRS, SEQUENCE, AFTER}


@dataclass
class Parked:
    message: AbstractIncomingMessage
    record: dict[str, Any]


class DashboardAdmin:
    def __init__(self, loaded: LoadedPipeline, broker_url: str | None, timeout: float) -> None:
        self.loaded = loaded
        self.url = broker_url or loaded.model.broker
        self.timeout = timeout
        if self.url.startswith("memory"):
            raise RunError(
                "the memory broker lives inside one `edarun up` process: its parked events are in the "
                "report (`--report FILE`, parked_events); the dashboard commands need a broker they can "
                "reach (--broker amqp://… or broker: in the pipeline)",
                EXIT_INVALID,
            )
        self.connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> DashboardAdmin:
        try:
            self.connection = await asyncio.wait_for(aio_pika.connect(self.url), self.timeout)
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            raise RunError(
                f"cannot reach broker {redact_url(self.url)}: {redact_text(str(exc)) or 'timed out'}",
                EXIT_FAILURE,
            ) from None
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def take_all(self, channel: aio_pika.abc.AbstractChannel) -> list[Parked]:
        """Every parked message of every consumer, unacknowledged: closing `channel` gives back
        whatever is not acknowledged."""
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
                parked.append(Parked(message, record))
        return parked

    async def records(self) -> list[dict[str, Any]]:
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            return [p.record for p in await self.take_all(channel)]
        finally:
            await channel.close()  # everything goes back, as it was

    async def find(self, channel: aio_pika.abc.AbstractChannel, message_id: str) -> Parked:
        for parked in await self.take_all(channel):
            if parked.record["id"] == message_id:
                return parked
        raise RunError(
            f"no parked event {message_id!r} in the dashboards of {self.loaded.path}", EXIT_INVALID
        )

    async def resubmit(self, message_id: str, event: dict[str, Any] | None) -> tuple[str, int]:
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            parked = await self.find(channel, message_id)
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
            broker = connect_url(self.url, queue_types=queue_types(self.loaded))
            try:
                await broker.connect(self.timeout)
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
            with contextlib.suppress(Exception):
                await channel.close()

    async def drop(self, message_id: str) -> dict[str, Any]:
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            parked = await self.find(channel, message_id)
            await parked.message.ack()
            return parked.record
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


def _text_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {k: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for k, v in headers.items()}


def run_admin(loaded: LoadedPipeline, broker_url: str | None, timeout: float, action: Any) -> Any:
    """Run `action(admin)` (a coroutine function) against the pipeline's dashboards."""

    async def go() -> Any:
        async with DashboardAdmin(loaded, broker_url, timeout) as admin:
            return await action(admin)

    return event_loop.run(go())
