"""Multi-broker (pattern 9): several brokers behind the one broker protocol.

Every queue exists on every broker. A publish goes to one broker, chosen by the spread: in turn
over the brokers that are up (`round_robin`), or by the event's context (`by_context(field)`:
rendezvous hashing, so a context stays on one broker, and when that broker is down only its
contexts move, back once it returns). A consumer reads every broker through one merged
subscription, and a depth is the sum over the brokers.

A broker that goes down is skipped: a publish it had not confirmed is sent to another broker
(at-least-once: it may then be on both; `dedupe` absorbs that), and it rejoins, for publishing
and consuming, once it is back and has its queues again. What it held is not lost (RabbitMQ keeps
persistent messages on disk): it is consumed when the broker returns, and until then its depth
is unknown (`Depth.complete` is False), so a run never takes the queue for empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import orjson

from .base import Broker, BrokerError, BrokerUnavailable, Depth, Message, Subscription, spread_key
from .merged import MergedSubscription

log = logging.getLogger("edarun.multi")

GIVE_UP_S = 120.0  # a publish waits this long for some broker to be up, then fails
RETRY_S = 1.0  # how often a broker that is down or unreachable is tried again
DEPTH_TIMEOUT_S = 2.0  # a depth a broker does not give within this is unknown
ATTACH_TIMEOUT_S = 10.0  # a consumer a broker does not open within this is opened on its next join
_RANKINGS = 100_000  # contexts whose broker order is remembered


class Member(Broker, Protocol):
    """A broker a multi-broker can hold: it says whether it is up, and when that changes."""

    @property
    def available(self) -> bool: ...

    def watch(self, callback: Callable[[], None]) -> None: ...


Opener = Callable[[Member], Awaitable[Subscription]]  # a child subscription on one broker


class MultiBroker:
    """The brokers of `brokers:` as one broker."""

    def __init__(self, members: Sequence[Member], *, spread_by: str | None = None) -> None:
        if len(members) < 2:
            raise ValueError("a multi-broker holds two brokers or more")
        self.members = list(members)
        self.urls = tuple(member.url for member in self.members)
        self.url = " + ".join(self.urls)
        self.system = self.members[0].system
        self.publish_window = self.members[0].publish_window
        self.spread_by = spread_by
        # Up and holding every declared queue: where publishes go, in the order of `brokers:`.
        self.ready: list[Member] = []
        self._turn = 0
        self._declared: dict[str, float | None] = {}  # queue → its `expires`
        self._live: dict[MergedSubscription, Opener] = {}  # open consumers → how to open a child
        self._joining: dict[Member, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()  # set, and replaced, when a broker goes down or comes back
        self._salts = [member.url.encode() for member in self.members]
        # Queues whose every message stays on one broker, whoever publishes it (a pipeline's config
        # commands: a handler's `set` must not overtake an earlier one).
        self.pinned: set[str] = set()
        self._rankings: dict[bytes, tuple[int, ...]] = {}
        self._closed = False

    # -- up and down ---------------------------------------------------------------------------

    async def connect(self, timeout: float) -> None:
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(member.connect(timeout), timeout) for member in self.members),
            return_exceptions=True,
        )
        if all(isinstance(outcome, BaseException) for outcome in outcomes):
            first = next(o for o in outcomes if isinstance(o, BaseException))
            raise BrokerError(f"no broker answered ({first or type(first).__name__})")
        for member, outcome in zip(self.members, outcomes, strict=True):
            member.watch(functools.partial(self._member_changed, member))
            if isinstance(outcome, BaseException):
                why = str(outcome) or type(outcome).__name__
                log.warning("broker %s unreachable (%s); going on with the others", member.url, why)
                self._join_later(member, connect=timeout)
            else:
                self.ready.append(member)
        self.ready.sort(key=self.members.index)

    def _member_changed(self, member: Member) -> None:
        if self._closed:
            return
        if not member.available:
            self._leave(member)
        elif member not in self.ready:
            self._join_later(member)

    def _leave(self, member: Member) -> None:
        if member in self.ready:
            log.warning("broker %s is down; publishing to the others until it is back", member.url)
            self.ready.remove(member)
            self._signal_change()
        if member.available:
            self._join_later(member, pause=True)  # it failed but says it is up: try it again soon

    def _signal_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _join_later(self, member: Member, *, connect: float | None = None, pause: bool = False) -> None:
        task = self._joining.get(member)
        if task is None or task.done():
            self._joining[member] = asyncio.ensure_future(self._join(member, connect, pause))

    async def _join(self, member: Member, connect: float | None, pause: bool) -> None:
        """Bring `member` (back) in once it answers: its queues, then the consumers' children."""
        if pause:
            await asyncio.sleep(RETRY_S)
        while not self._closed:
            try:
                if connect is not None:
                    await asyncio.wait_for(member.connect(connect), connect)
                    connect = None
                if member.available and await self._catch_up(member):
                    if member not in self.ready:  # no await since the check: nothing opened meanwhile
                        self.ready.append(member)
                        self.ready.sort(key=self.members.index)
                        log.warning("broker %s is back; publishing to it again", member.url)
                        self._signal_change()
                    return
            except (BrokerError, OSError, TimeoutError) as exc:
                log.debug("broker %s not back yet: %s", member.url, exc)
            await self._wait_change(RETRY_S)

    async def _catch_up(self, member: Member) -> bool:
        """Declare every queue on `member` and open there every consumer's subscription (those
        opened while this runs too); False when it failed on the way."""
        declared: set[str] = set()
        while True:
            queues = [queue for queue in self._declared if queue not in declared]
            missing = [(m, opener) for m, opener in self._live.items() if member not in m.children]
            if not queues and not missing:
                return member.available
            for queue in queues:
                await member.declare(queue, expires=self._declared[queue])
                declared.add(queue)
            for merged, opener in missing:
                if not await self._attach(merged, member, opener):
                    return False

    async def _wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- publishing ----------------------------------------------------------------------------

    def _choose(self, queue: str, message: Message, tried: set[Member] | None = None) -> Member | None:
        ready = self.ready if not tried else [m for m in self.ready if m not in tried]
        if not ready:
            return None
        key = message.pin
        if key is None and queue in self.pinned:
            key = queue.encode()
        if key is None and self.spread_by is not None:
            key = message.key
            if key is None:
                key = _key_of(message.body, self.spread_by)
        if key:
            for index in self._ranking(key):
                member = self.members[index]
                if member in ready:
                    return member
        turn = self._turn
        self._turn = turn + 1
        return ready[turn % len(ready)]

    def _ranking(self, key: bytes) -> tuple[int, ...]:
        """The brokers in a context's order of preference (highest random weight first): the same
        in every process, and independent of which brokers are up."""
        ranking = self._rankings.get(key)
        if ranking is None:
            if len(self._rankings) >= _RANKINGS:
                self._rankings.clear()
            weights = [hashlib.blake2b(key, digest_size=8, key=salt).digest() for salt in self._salts]
            ranking = self._rankings[key] = tuple(
                sorted(range(len(weights)), key=weights.__getitem__, reverse=True)
            )
        return ranking

    async def publish(self, queue: str, message: Message) -> str:
        member = self._choose(queue, message)
        if member is not None:
            try:
                return await member.publish(queue, message)
            except BrokerUnavailable:
                self._leave(member)
        return await self._failover(queue, message, {member} if member is not None else set())

    async def _failover(self, queue: str, message: Message, tried: set[Member]) -> str:
        """Send a message its broker did not confirm to another one, waiting for one if none is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GIVE_UP_S
        while True:
            member = self._choose(queue, message, tried)
            if member is None:
                if loop.time() > deadline:
                    raise BrokerError(f"no broker of {self.url} took a message for {queue!r} in time")
                await self._wait_change(RETRY_S)
                tried.clear()  # a broker that failed it may be back by now
                continue
            try:
                return await member.publish(queue, message)
            except BrokerUnavailable:
                tried.add(member)
                self._leave(member)

    async def broadcast(self, exchange: str, message: Message) -> None:
        """On the first broker that is up: every listener listens on all of them."""
        for member in list(self.ready):
            try:
                await member.broadcast(exchange, message)
                return
            except BrokerUnavailable:
                self._leave(member)
        raise BrokerError(f"broadcast on {exchange!r}: no broker of {self.url} is up")

    # -- queues and consumers ------------------------------------------------------------------

    async def declare(self, queue: str, *, expires: float | None = None) -> None:
        self._declared[queue] = expires  # and on each broker that joins later
        for member in list(self.ready):
            try:
                await member.declare(queue, expires=expires)
            except BrokerUnavailable:
                self._leave(member)

    async def consume(self, queue: str, *, prefetch: int) -> MergedSubscription:
        # The window is shared: a consumer holds about `prefetch` deliveries in all, as with one broker.
        share = max(1, -(-prefetch // len(self.members)))
        return await self._merged(queue, lambda member: member.consume(queue, prefetch=share))

    async def listen(self, exchange: str) -> MergedSubscription:
        return await self._merged(exchange, lambda member: member.listen(exchange))

    async def _merged(self, queue: str, opener: Opener) -> MergedSubscription:
        merged = MergedSubscription(queue, on_end=self._ended)
        self._live[merged] = opener
        for member in list(self.ready):
            if not await self._attach(merged, member, opener):
                if member.available:
                    # Slow, not down: it keeps its publishes (a context does not move for a slow
                    # consume); the child is opened again shortly, by a catch-up.
                    self._join_later(member, pause=True)
                else:
                    self._leave(member)  # its join opens this one's child too
        return merged

    def _ended(self, merged: MergedSubscription) -> None:
        self._live.pop(merged, None)  # cancelled: no broker that joins later opens a child for it

    async def _attach(self, merged: MergedSubscription, member: Member, opener: Opener) -> bool:
        """Open `merged`'s subscription on `member` unless it has one; False when it could not."""
        if merged.cancelled or member in merged.children:
            return True
        try:
            child = await asyncio.wait_for(opener(member), ATTACH_TIMEOUT_S)
        except (BrokerUnavailable, TimeoutError):
            return False
        if not merged.add(member, child):
            await child.close()  # cancelled meanwhile, or opened by a join at the same time
        return True

    async def depth(self, queue: str) -> Depth:
        depths = await asyncio.gather(*(self._depth(member, queue) for member in self.members))
        known = [d for d in depths if d is not None]
        return Depth(
            sum(d.ready for d in known),
            sum(d.unacked for d in known),
            complete=len(known) == len(depths) and all(d.complete for d in known),
        )

    async def _depth(self, member: Member, queue: str) -> Depth | None:
        if member not in self.ready:
            return None
        try:
            return await asyncio.wait_for(member.depth(queue), DEPTH_TIMEOUT_S)
        except (BrokerUnavailable, TimeoutError):
            return None

    async def close(self) -> None:
        self._closed = True
        for task in self._joining.values():
            task.cancel()
        await asyncio.gather(*self._joining.values(), return_exceptions=True)
        for member in self.members:
            await member.close()


def _key_of(body: bytes, field: str) -> bytes:
    """The spread key of an encoded event (a publish that came without one: a retry, a parking)."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return b""
    return spread_key(event, field) if isinstance(event, dict) else b""
