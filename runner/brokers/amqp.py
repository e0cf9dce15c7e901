"""RabbitMQ through aio-pika: durable queues, persistent messages, publisher confirms, manual acks.

Reconnects are this module's job. The robust connection restores channels, queues, QoS and
consumers; a publish caught by a dropped connection is sent again once the channel is back (the
broker may then hold it twice: consumers dedupe by message id); an acknowledgement for a delivery
of a channel that died is dropped, because the broker delivers that message again. A member of a
multi-broker (`failover=True`) does not wait for its connection to come back: an operation on it
while it is down raises `BrokerUnavailable` at once, and the multi-broker turns to another broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from ..redact import redact_text, redact_url
from .base import BrokerError, BrokerUnavailable, Delivery, Depth, Message

log = logging.getLogger("edarun.amqp")

# A connection problem while publishing: wait for the robust connection and send again.
_RETRYABLE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,
)
_PUBLISH_GIVE_UP_S = 120.0
_RECONNECT_INTERVAL = 1.0  # seconds between attempts to reach a broker that went away
_STOP = object()
_ACK_DELAY = 0.005  # seconds an acknowledgement may wait to share a frame with later ones
_CANCEL_WAIT_S = 2.0  # a consumer's cancel or a channel's close, at most, when the broker is gone
_FAILOVER_CONFIRM_S = 10.0  # a multi-broker's member that does not confirm within this is left


class AmqpDelivery:
    __slots__ = ("_channel", "_sub", "_tag", "body", "headers", "message_id", "queue", "redelivered")

    def __init__(self, channel: Any, message: AbstractIncomingMessage, sub: AmqpSubscription) -> None:
        self._channel = channel  # the underlying channel it came on: its tag means nothing elsewhere
        self._tag = message.delivery_tag or 0
        self._sub = sub
        self.body = message.body
        self.headers = dict(message.headers or {})
        self.message_id = message.message_id or f"amqp-{message.delivery_tag}"
        self.queue = sub.queue
        self.redelivered = bool(message.redelivered)

    @property
    def stale(self) -> bool:
        return self._channel is not self._sub._underlay or self._channel.is_closed

    @property
    def broker(self) -> str:
        return self._sub.broker.url

    async def ack(self) -> None:
        self._sub.ack(self._channel, self._tag)

    async def nack(self, *, requeue: bool) -> None:
        await self._sub.nack(self._channel, self._tag, requeue)


class AmqpSubscription:
    """One consumer on its own channel (its own prefetch window; closing it returns what it held).

    Acknowledgements are batched: the highest delivery tag below which everything is settled is
    acknowledged with `multiple=True` once a quarter of the prefetch window has settled, or 5 ms
    after the first of them, instead of a frame per message.
    """

    def __init__(self, broker: AmqpBroker, queue: str, prefetch: int) -> None:
        self.broker = broker
        self.queue = queue
        self.prefetch = prefetch
        # Deliveries received and not yet handed out, and the worker waiting for one.
        self._inbox: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._channel: AbstractRobustChannel | None = None
        self._amqp_queue: Any = None
        self._consumer_tag: str | None = None
        self._cancelled = False
        # Tags of the current underlying channel, in delivery order, and those already settled.
        self._underlay: Any = None
        self.generation = 0  # reconnects seen (Subscription.generation)
        self._outstanding: deque[int] = deque()
        self._settled: set[int] = set()
        self._nacked: set[int] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._unflushed = 0
        self._batch = max(1, prefetch // 4)
        self._acks_in_flight: set[asyncio.Task[None]] = set()

    async def start(self, exchange: str | None = None) -> None:
        """Consume the queue; with `exchange`, a queue of its own bound to that fanout exchange."""
        channel = await self.broker.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        self._channel = channel
        if exchange is None:
            # Declared (passively) through the robust channel, so a reconnect restores its consumer.
            self._amqp_queue = await channel.declare_queue(self.queue, passive=True)
        else:
            fanout = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
            # Exclusive and server-named: it goes with this listener (and its connection).
            self._amqp_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await self._amqp_queue.bind(fanout)
            self.queue = self._amqp_queue.name
        self._consumer_tag = await self._amqp_queue.consume(self._receive, no_ack=False)

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        channel = message.channel
        if channel is not self._underlay:
            # A new channel after a reconnect: the old tags died with the old one.
            if self._underlay is not None:
                self.generation += 1
            self._underlay = channel
            self._outstanding.clear()
            self._settled.clear()
            self._nacked.clear()
        self._outstanding.append(message.delivery_tag or 0)
        self._put((channel, message))

    def _put(self, item: Any) -> None:
        self._inbox.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._listeners:
            listeners, self._listeners = self._listeners, []
            for callback in listeners:
                callback()

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    @property
    def ended(self) -> bool:
        inbox = self._inbox
        return self._cancelled and (not inbox or inbox[0] is _STOP)

    def poll(self) -> Delivery | None:
        inbox = self._inbox
        while inbox:
            item = inbox[0]
            if item is _STOP:
                return None  # it stays: every later call ends too
            inbox.popleft()
            channel, message = item
            if channel is self._underlay and not channel.is_closed:
                return AmqpDelivery(channel, message, self)
            # Prefetched on a channel that died: RabbitMQ delivers it again on the new one.
        return None

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    async def __anext__(self) -> Delivery:
        while True:
            delivery = self.poll()
            if delivery is not None:
                return delivery
            if self.ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def held(self) -> int:
        """Deliveries received and not yet settled. None once their channel died: the broker has
        taken them back (and may have given them to another consumer), whatever this one got."""
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            return 0
        return len(self._outstanding) - len(self._settled)

    def _current(self, channel: Any, tag: int) -> bool:
        if channel is self._underlay and not channel.is_closed:
            return True
        log.debug("%s: delivery %s came on a closed channel; the broker redelivers it", self.queue, tag)
        return False

    def ack(self, channel: Any, tag: int) -> None:
        if self._current(channel, tag):
            self._settled.add(tag)
            self._unflushed += 1
            if self._unflushed >= self._batch:
                self._flush()
            elif self._flush_timer is None:
                self._flush_timer = asyncio.get_running_loop().call_later(_ACK_DELAY, self._flush)

    async def nack(self, channel: Any, tag: int, requeue: bool) -> None:
        if not self._current(channel, tag):
            return
        self._flush()  # the acks before it go first
        self._settled.add(tag)
        self._nacked.add(tag)
        with contextlib.suppress(*_RETRYABLE):
            await channel.basic_nack(tag, multiple=False, requeue=requeue)
        self._flush()  # it may have closed a gap: ack what follows it

    def _advance(self) -> int | None:
        """Pop the settled prefix; the highest *acked* tag in it is what `multiple=True` may name
        (a nacked tag is gone from the broker, and naming it would close the channel)."""
        highest = None
        while self._outstanding and self._outstanding[0] in self._settled:
            tag = self._outstanding.popleft()
            self._settled.discard(tag)
            if tag in self._nacked:
                self._nacked.discard(tag)
            else:
                highest = tag
        return highest

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._unflushed = 0
        highest = self._advance()
        channel = self._underlay
        if highest is None or channel is None or channel.is_closed:
            return
        task = asyncio.ensure_future(self._send_ack(channel, highest))
        self._acks_in_flight.add(task)
        task.add_done_callback(self._acks_in_flight.discard)

    async def _send_ack(self, channel: Any, tag: int) -> None:
        with contextlib.suppress(*_RETRYABLE):
            await channel.basic_ack(tag, multiple=True)

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._amqp_queue is not None and self._consumer_tag is not None:
            # The robust queue forgets the consumer before its RPC, so a cancel cut short (the
            # connection is down and the RPC would wait for it) still keeps it from coming back.
            with contextlib.suppress(*_RETRYABLE):
                await asyncio.wait_for(self._amqp_queue.cancel(self._consumer_tag), _CANCEL_WAIT_S)
        # Prefetched but not handed out: not started, so not ours to finish. They stay unacked and
        # go back to the queue when the channel closes, instead of delaying the stop by a window.
        self._inbox.clear()
        self._put(_STOP)

    async def close(self) -> None:
        await self.cancel()
        self._flush()
        if self._acks_in_flight:
            await asyncio.gather(*self._acks_in_flight, return_exceptions=True)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*_RETRYABLE):
                # What it still held goes back to the queue (with the connection, if it is gone).
                await asyncio.wait_for(self._channel.close(), _CANCEL_WAIT_S)
        self.broker.subscriptions.discard(self)


class AmqpBroker:
    """The `amqp://` broker."""

    system = "rabbitmq"
    publish_window = 256  # confirms a producer keeps in flight
    spread_by: str | None = None

    def __init__(
        self, url: str, *, queue_types: dict[str, str] | None = None, failover: bool = False
    ) -> None:
        self._url = url
        self.url = redact_url(url)
        self.urls: tuple[str, ...] = (self.url,)
        self.queue_types = queue_types or {}
        self.failover = failover  # a multi-broker's member: fail at once while down
        self._up = False  # connected, channels restored
        self._watchers: list[Callable[[], None]] = []
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._admin_channel: AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        self.subscriptions: set[AmqpSubscription] = set()
        self._closing = False
        # Publishes in the order they were first sent; those being sent again after a reconnect.
        self._exchanges: dict[str, Any] = {}
        self._tickets = itertools.count()
        self._resending: list[int] = []
        self._resent = asyncio.Condition()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerError("not connected")
        return self._connection

    async def connect(self, timeout: float) -> None:
        self._closing = False  # a multi-broker tries again a member it could not reach
        try:
            self._connection = await aio_pika.connect_robust(
                self._url, timeout=timeout, reconnect_interval=_RECONNECT_INTERVAL
            )
            self._connection.close_callbacks.add(self._lost)
            self._connection.reconnect_callbacks.add(self._back)
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._admin_channel = await self._connection.channel(publisher_confirms=False)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            await self.close()
            raise BrokerError(redact_text(str(exc)) or type(exc).__name__) from None
        self._available(True)

    def _lost(self, _: Any, reason: BaseException | None = None) -> None:
        # Called again by each failed attempt to reconnect: said once per outage.
        if self._connection is not None and not self._closing and self._up:
            detail = redact_text(str(reason)) if reason else "closed"
            log.warning("connection to %s lost (%s); reconnecting", self.url, detail)
            self._available(False)

    def _back(self, *_: Any) -> None:
        log.warning("reconnected to %s", self.url)
        self._available(True)  # called once the robust connection has restored its channels

    @property
    def available(self) -> bool:
        return self._up

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `available` changes."""
        self._watchers.append(callback)

    def _available(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            for callback in list(self._watchers):
                callback()

    def _refuse_while_down(self) -> None:
        if self.failover and not self._up:
            raise BrokerUnavailable(f"{self.url} is down")

    async def declare(self, queue: str, *, expires: float | None = None) -> None:
        if queue in self._declared:
            return
        self._refuse_while_down()
        arguments: dict[str, Any] = {}
        queue_type = self.queue_types.get(queue, "classic")
        if queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        if expires is not None:
            arguments["x-expires"] = int(expires * 1000)
        channel = self._admin_channel
        assert channel is not None
        try:
            await channel.declare_queue(queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # The channel closed; reopen it for the next operation.
            await channel.reopen()
            raise BrokerError(
                f"queue {queue!r} exists on the broker with other settings ({exc}); "
                "delete it or match its type"
            ) from None
        except _RETRYABLE as exc:
            if not self.failover:
                raise
            raise BrokerUnavailable(f"declare {queue!r} on {self.url}: {redact_text(str(exc))}") from None
        self._declared.add(queue)

    async def publish(self, queue: str, message: Message) -> str:
        self._refuse_while_down()
        channel = self._publish_channel
        if channel is None:
            raise BrokerError("not connected")
        outgoing = aio_pika.Message(
            message.body,
            message_id=message.message_id,
            headers=message.headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            if message.persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        ticket = next(self._tickets)
        if self._resending:
            await self._after_resends()  # a reconnect's publishes go out again before any new one
        deadline = time.monotonic() + _PUBLISH_GIVE_UP_S
        resending = False
        try:
            while True:
                if resending:
                    await self._turn(ticket)
                try:
                    sent = channel.default_exchange.publish(outgoing, routing_key=queue, mandatory=True)
                    if self.failover:
                        # A partitioned broker answers nothing until a heartbeat declares it dead:
                        # its contexts go to another broker instead of waiting for that.
                        await asyncio.wait_for(sent, _FAILOVER_CONFIRM_S)
                    else:
                        await sent
                    return self.url
                except aio_pika.exceptions.PublishError:
                    raise BrokerError(f"queue {queue!r} does not exist (unroutable message)") from None
                except aiormq.exceptions.DeliveryError as exc:
                    raise BrokerError(f"the broker refused a message for {queue!r}: {exc}") from None
                except _RETRYABLE as exc:
                    if self.failover:  # not confirmed: the multi-broker sends it to another broker
                        detail = redact_text(str(exc)) or type(exc).__name__
                        raise BrokerUnavailable(f"publish to {queue!r} on {self.url}: {detail}") from None
                    if time.monotonic() > deadline:
                        raise BrokerError(f"publish to {queue!r} failed: {redact_text(str(exc))}") from None
                    # The confirm was lost with the connection: send again once the channel is back.
                    log.debug(
                        "publish to %s interrupted (%s); sent again after reconnect",
                        queue,
                        type(exc).__name__,
                    )
                    if not resending:
                        resending = True
                        heapq.heappush(self._resending, ticket)
                    with contextlib.suppress(*_RETRYABLE):
                        await asyncio.wait_for(channel.ready(), max(deadline - time.monotonic(), 0.1))
                    await asyncio.sleep(0.05)  # every publish of the dead channel has failed by now
        finally:
            if resending:
                self._resending.remove(ticket)
                heapq.heapify(self._resending)
                async with self._resent:
                    self._resent.notify_all()

    async def _turn(self, ticket: int) -> None:
        """Publishes interrupted by a reconnect are sent again one at a time, in their first order:
        a re-sent event must not overtake one published before it (ordering, pattern 2)."""
        async with self._resent:
            await self._resent.wait_for(lambda: self._resending[0] == ticket)

    async def _after_resends(self) -> None:
        async with self._resent:
            await self._resent.wait_for(lambda: not self._resending)

    async def consume(self, queue: str, *, prefetch: int) -> AmqpSubscription:
        sub = AmqpSubscription(self, queue, prefetch)
        await self._start(sub)
        self.subscriptions.add(sub)
        return sub

    async def _start(self, sub: AmqpSubscription, exchange: str | None = None) -> None:
        self._refuse_while_down()
        try:
            await sub.start(exchange)
        except _RETRYABLE as exc:
            if not self.failover:
                raise
            raise BrokerUnavailable(f"consume {sub.queue!r} on {self.url}: {redact_text(str(exc))}") from None

    async def broadcast(self, exchange: str, message: Message) -> None:
        self._refuse_while_down()
        channel = self._publish_channel
        if channel is None:
            raise BrokerError("not connected")
        fanout = self._exchanges.get(exchange)
        try:
            if fanout is None:
                fanout = self._exchanges[exchange] = await channel.declare_exchange(
                    exchange, aio_pika.ExchangeType.FANOUT, durable=True
                )
            outgoing = aio_pika.Message(
                message.body, message_id=message.message_id, headers=message.headers,
                content_type="application/json", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            )  # fmt: skip
            await fanout.publish(outgoing, routing_key="", mandatory=False)  # no listener: fine
        except (*_RETRYABLE, aiormq.exceptions.AMQPError) as exc:
            self._exchanges.pop(exchange, None)
            raise BrokerError(f"broadcast on {exchange!r} failed: {redact_text(str(exc))}") from None

    async def listen(self, exchange: str) -> AmqpSubscription:
        sub = AmqpSubscription(self, exchange, prefetch=100)
        await self._start(sub, exchange)
        self.subscriptions.add(sub)
        return sub

    async def depth(self, queue: str) -> Depth:
        """Ready messages as the broker counts them. AMQP does not report unacknowledged messages,
        so `unacked` counts those this process holds (its consumers' outstanding deliveries)."""
        self._refuse_while_down()
        channel = self._admin_channel
        assert channel is not None
        while True:
            try:
                underlay = await channel.get_underlay_channel()
                result = await underlay.queue_declare(queue, passive=True)
                held = sum(s.held for s in self.subscriptions if s.queue == queue)
                return Depth(result.message_count or 0, held)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await channel.reopen()
                return Depth(0, 0)
            except _RETRYABLE as exc:
                if self.failover:  # down: a multi-broker counts its depth as unknown
                    detail = redact_text(str(exc)) or type(exc).__name__
                    raise BrokerUnavailable(f"depth of {queue!r} on {self.url}: {detail}") from None
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        self._closing = True
        for sub in list(self.subscriptions):
            with contextlib.suppress(Exception):
                await sub.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), _CANCEL_WAIT_S)
        self._connection = None
