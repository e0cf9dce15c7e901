"""Ambulance / carpool (pattern 3): `priority_lane` gives a queue a second queue for urgent events.

The lane is a real queue, `<queue>.priority`, beside the standard one: broker priorities would be
defeated by prefetch (a consumer's window already full of standard messages) and differ between
classic and quorum queues. This module owns the three parts of the pattern:

- *where an event goes* (`LaneRule`): a publisher sends an event to the lane when the consumer's
  `when(...)` holds for it, or when it was marked (a producer's `priority: when(...)`,
  `ctx.publish(..., priority=True)`, `edarun send --priority`);
- *who takes it first* (`PriorityFeed`): an ambulance worker reads the lane before its standard
  subscription, waking on whichever has a delivery, never polling in a loop; carpool workers read
  only the lane (the pools in `runtime.pool` and `patterns.ordering` decide who is which);
- *how it keeps order* (`Sequencer`, `OrderGuard`): with `ordering` on, a priority event may overtake
  other contexts' backlog but never an earlier event of its own context. Each publisher numbers its
  events per lane and stamps on each the number of its context's previous event in the *other* lane;
  the ordered consumer's dispatcher holds an event until that predecessor has reached it. Each lane is
  FIFO per publisher, so "a later event of this publisher in that lane has arrived" means the
  predecessor has too, or was processed before this consumer started.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..brokers import Delivery, Subscription
from ..config.expr import Predicate, predicate
from ..config.models import Pipeline
from ..types import Event

LANE_SUFFIX = ".priority"
PRIORITY, STANDARD = "priority", "standard"
SEQUENCE = "x-edarun-seq"  # "<publisher>:<n>": the n-th ordered event of this publisher in its lane
AFTER = "x-edarun-after"  # n of the previous event of its context in the other lane, by the same publisher
MAX_CONTEXTS = 100_000
YIELD_EVERY = 64  # contexts a publisher remembers per queue; older ones fall back to a floor


def lane_queue(queue: str) -> str:
    return queue + LANE_SUFFIX


@dataclass(frozen=True)
class LaneRule:
    """How events published to `queue` pick their lane."""

    queue: str
    lane: str
    when: str | None  # CEL: the event is priority when it holds
    order_by: str | None  # the consumer's ordering field: events are sequenced (see module doc)
    holds: Predicate | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "holds", predicate(self.when) if self.when is not None else None)

    def is_priority(self, event: Event, marked: bool) -> bool:
        holds = self.holds
        return marked or (holds is not None and holds(event))


def lane_rules(model: Pipeline) -> dict[str, LaneRule]:
    """Queue → its lane rule, for every queue whose consumer has a priority lane."""
    rules: dict[str, LaneRule] = {}
    for consumer in model.consumers.values():
        lane = consumer.priority_lane
        if lane is None:
            continue
        order_by = consumer.ordering.by if consumer.ordering else None
        previous = rules.get(consumer.from_)
        if previous is not None and previous.order_by and not order_by:
            order_by = previous.order_by  # checks.py requires the consumers of a queue to agree
        rules[consumer.from_] = LaneRule(consumer.from_, lane_queue(consumer.from_), lane.when, order_by)
    return rules


def lanes_of(model: Pipeline) -> list[str]:
    return [rule.lane for rule in lane_rules(model).values()]


class Sequencer:
    """One publisher's numbering of the events it sends to one ordered, laned queue."""

    def __init__(self, publisher: str) -> None:
        self.publisher = publisher
        self.count = {STANDARD: 0, PRIORITY: 0}
        # context → [n of its last standard event, n of its last priority event] (0: none).
        self.last: OrderedDict[Any, list[int]] = OrderedDict()
        # Forgotten contexts: an event of one waits for the newest forgotten number instead, which
        # is safe (that event came no earlier than the forgotten context's) and long since arrived.
        self.floor = {STANDARD: 0, PRIORITY: 0}

    def stamp(self, context: Any, lane: str, headers: dict[str, Any]) -> None:
        other = PRIORITY if lane == STANDARD else STANDARD
        n = self.count[lane] = self.count[lane] + 1
        headers[SEQUENCE] = f"{self.publisher}:{n}"
        last = self.last.get(context)
        if last is None:
            after = self.floor[other]
            last = self.last[context] = [0, 0]
            if len(self.last) > MAX_CONTEXTS:
                _, forgotten = self.last.popitem(last=False)
                self.floor[STANDARD] = max(self.floor[STANDARD], forgotten[0])
                self.floor[PRIORITY] = max(self.floor[PRIORITY], forgotten[1])
        else:
            after = last[0 if other == STANDARD else 1]
            self.last.move_to_end(context)
        if after:
            headers[AFTER] = after
        last[0 if lane == STANDARD else 1] = n


def sequence_of(delivery: Delivery) -> tuple[str, int] | None:
    value = delivery.headers.get(SEQUENCE)
    if not isinstance(value, str | bytes):
        return None
    text = value.decode() if isinstance(value, bytes) else value
    publisher, _, n = text.rpartition(":")
    return (publisher, int(n)) if publisher and n.isdigit() else None


class PriorityFeed:
    """Deliveries from a lane subscription first, then from a standard one, as one subscription.

    The ambulance of the talk spun on two non-blocking receives; this one polls each once and, with
    neither ready, sleeps until either subscription says a delivery arrived. The lane subscription
    may be shared by every worker of a pool: whichever worker is free next takes the lane event.
    `cancel` and `close` act on the standard subscription only when the lane is shared.
    """

    def __init__(self, lane: Subscription, standard: Subscription, *, owns_lane: bool) -> None:
        self.lane = lane
        self.standard = standard
        self.owns_lane = owns_lane
        self._signal: asyncio.Future[None] | None = None
        self._cancelled = False
        self._since_yield = 0
        self._lane_maybe = True  # False once the lane was found empty, until it says otherwise

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    @property
    def held(self) -> int:
        return self.standard.held + (self.lane.held if self.owns_lane else 0)

    @property
    def ended(self) -> bool:
        return self._cancelled or (self.lane.ended and self.standard.ended)

    def poll(self) -> Delivery | None:
        if self._cancelled:
            return None
        return self._lane_poll() or self.standard.poll()

    def _lane_poll(self) -> Delivery | None:
        """The lane's next delivery. An idle lane is asked once: then it tells us when one arrives,
        and until then each standard delivery costs no look at the lane."""
        if not self._lane_maybe:
            return None
        delivery = self.lane.poll()
        if delivery is None:
            self._lane_maybe = False
            self.lane.listen(self._lane_arrived)
        return delivery

    def _lane_arrived(self) -> None:
        self._lane_maybe = True
        self._wake()

    async def __anext__(self) -> Delivery:
        while True:
            if self._cancelled:
                delivery = None
            elif self._lane_maybe:
                delivery = self._lane_poll() or self.standard.poll()
            else:  # the hot path of an idle lane: one attribute read more than no lane at all
                delivery = self.standard.poll()
            if delivery is not None:
                self._since_yield += 1
                if self._since_yield >= YIELD_EVERY:
                    # Deliveries ready back to back never suspend: let the other tasks run.
                    self._since_yield = 0
                    await asyncio.sleep(0)
                return delivery
            if self.ended:
                raise StopAsyncIteration
            # The lane, found empty, already said it will call _lane_arrived: only the standard
            # subscription still needs asking.
            signal = self._signal = asyncio.get_running_loop().create_future()
            self.standard.listen(self._wake)
            try:
                await signal
            finally:
                self._signal = None
                self.standard.unlisten(self._wake)

    def _wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    def listen(self, callback: Callable[[], None]) -> None:
        self.lane.listen(callback)
        self.standard.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        self.lane.unlisten(callback)
        self.standard.unlisten(callback)

    async def cancel(self) -> None:
        self._cancelled = True
        self.lane.unlisten(self._lane_arrived)
        self._wake()
        await self.standard.cancel()
        if self.owns_lane:
            await self.lane.cancel()

    async def close(self) -> None:
        self._cancelled = True
        self.lane.unlisten(self._lane_arrived)
        self._wake()
        await self.standard.close()
        if self.owns_lane:
            await self.lane.close()


Item = Any  # what the dispatcher routes: (delivery, make), opaque here


class OrderGuard:
    """The ordered dispatcher's check that an event's predecessor in the other lane came first.

    `admit` takes each delivery as it arrives and returns the items that may be routed now, in order:
    the delivery itself unless it must wait, then any held ones it set free. `drained` releases the
    events waiting on a lane that has nothing left to deliver: their predecessor was processed
    before this consumer started.
    """

    def __init__(self, standard: str, lane: str) -> None:
        self.other = {standard: lane, lane: standard}
        self.routed: dict[tuple[str, str], int] = {}  # (publisher, queue) → highest n routed
        self.held_numbers: dict[tuple[str, str], set[int]] = {}
        # (publisher, queue waited on) → [(n waited for, own queue, own n, item, loop time held)]
        self.waiting: dict[tuple[str, str], list[tuple[int, str, int, Item, float]]] = {}

    def __len__(self) -> int:
        return sum(len(w) for w in self.waiting.values())

    def waiting_on(self) -> set[str]:
        return {queue for (_, queue), items in self.waiting.items() if items}

    def admit(self, delivery: Delivery, item: Item, now: float) -> list[Item]:
        sequence = sequence_of(delivery)
        if sequence is None:
            return [item]
        publisher, n = sequence
        after = delivery.headers.get(AFTER)
        other = self.other[delivery.queue]
        if isinstance(after, int) and not self._arrived(publisher, other, after):
            self.waiting.setdefault((publisher, other), []).append((after, delivery.queue, n, item, now))
            self.held_numbers.setdefault((publisher, delivery.queue), set()).add(n)
            return []
        return [item, *self._routed(publisher, delivery.queue, n)]

    def _arrived(self, publisher: str, queue: str, n: int) -> bool:
        """Has event n of `publisher` in `queue` been routed (or processed before we started)?"""
        key = (publisher, queue)
        return self.routed.get(key, 0) >= n and n not in self.held_numbers.get(key, ())

    def _routed(self, publisher: str, queue: str, n: int) -> list[Item]:
        """Record that (publisher, queue, n) was routed; return what that set free, in order."""
        freed: list[Item] = []
        work = [(publisher, queue, n)]
        while work:
            publisher, queue, n = work.pop()
            key = (publisher, queue)
            if n > self.routed.get(key, 0):
                self.routed[key] = n
            waiters = self.waiting.get(key)
            if not waiters:
                continue
            keep = []
            for entry in waiters:
                after, own_queue, own_n, item, _ = entry
                if self._arrived(publisher, queue, after):
                    freed.append(item)
                    self.held_numbers[(publisher, own_queue)].discard(own_n)
                    work.append((publisher, own_queue, own_n))
                else:
                    keep.append(entry)
            if keep:
                self.waiting[key] = keep
            else:
                del self.waiting[key]
        return freed

    def drained(self, queue: str, before: float) -> list[Item]:
        """`queue` had nothing ready and nothing arriving: release what waited on it since `before`."""
        released: list[tuple[str, str, int, Item]] = []
        for key in [k for k in self.waiting if k[1] == queue]:
            keep = []
            for entry in self.waiting[key]:
                after, own_queue, own_n, item, held_at = entry
                # A predecessor that is itself held here has arrived: it keeps its own wait.
                if held_at < before and after not in self.held_numbers.get(key, ()):
                    released.append((key[0], own_queue, own_n, item))
                else:
                    keep.append(entry)
            if keep:
                self.waiting[key] = keep
            else:
                del self.waiting[key]
        freed: list[Item] = []
        for publisher, own_queue, own_n, item in released:
            freed.append(item)
            self.held_numbers[(publisher, own_queue)].discard(own_n)
            freed += self._routed(publisher, own_queue, own_n)
        return freed
