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
  standard events and stamps on each priority event the number of its context's last standard
  event; the ordered consumer's dispatcher holds a priority event until that predecessor has reached
  it. The standard queue is FIFO per publisher, so "a later standard event of this publisher has
  arrived" means the predecessor has too, or was processed before this consumer started.
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
SEQUENCE = "x-edarun-seq"  # "<publisher>:<n>": the n-th standard event of this publisher (0: priority)
AFTER = "x-edarun-after"  # on a priority event: n of its context's last standard event, same publisher
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


def update_rules(rules: dict[str, LaneRule], model: Pipeline) -> None:
    """Adopt `model`'s lane expressions in `rules`, the dict every publisher of this process reads
    (edarun up --reload). Which queues have a lane does not change live."""
    for queue, rule in lane_rules(model).items():
        if queue in rules and rules[queue] != rule:
            rules[queue] = rule


def lanes_of(model: Pipeline) -> list[str]:
    return [rule.lane for rule in lane_rules(model).values()]


class Sequencer:
    """One publisher's numbering of the events it sends to one ordered, laned queue.

    Standard events are numbered; a priority event names the number of its context's last
    standard event (`AFTER`), which the consumer's dispatcher waits for. Standard events never wait
    (see OrderGuard), so the numbering runs over standard events only.
    """

    def __init__(self, publisher: str) -> None:
        self.publisher = publisher
        self.count = 0  # standard events sent
        self.last: OrderedDict[Any, int] = OrderedDict()  # context → n of its last standard event
        # Forgotten contexts: a priority event of one waits for the newest forgotten number
        # instead, which is safe (that event came no earlier) and long since delivered.
        self.floor = 0

    def stamp(self, context: Any, lane: str, headers: dict[str, Any]) -> None:
        if lane == PRIORITY:
            after = self.last.get(context, self.floor)
            headers[SEQUENCE] = f"{self.publisher}:0"
            if after:
                headers[AFTER] = after
            return
        n = self.count = self.count + 1
        headers[SEQUENCE] = f"{self.publisher}:{n}"
        last = self.last
        if context in last:
            last.move_to_end(context)
        last[context] = n
        if len(last) > MAX_CONTEXTS:
            _, forgotten = last.popitem(last=False)
            self.floor = max(self.floor, forgotten)


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

    @property
    def generation(self) -> int:
        return self.lane.generation + self.standard.generation

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
    """The ordered dispatcher's check that a priority event's predecessor of its context, in the
    standard queue, came first.

    `admit` takes each delivery as it arrives and returns the items that may be routed now, in
    order: the delivery itself unless it must wait, then any held ones it set free. Only priority
    events wait; a standard event never does, so the standard queue always flows and held events
    cannot fill both prefetch windows and stall each other. (A standard event reaches the
    dispatcher after an earlier priority event of its context because the lane is read first.)
    `drained` releases what waits on a standard queue that has nothing left to deliver: the
    predecessor was processed before this consumer started.
    """

    def __init__(self, standard: str, lane: str) -> None:
        self.standard = standard
        self.lane = lane
        self.routed: dict[str, int] = {}  # publisher → highest standard number routed
        # publisher → [(standard number waited for, item, its delivery, loop time held)]
        self.waiting: dict[str, list[tuple[int, Item, Delivery, float]]] = {}

    def __len__(self) -> int:
        return sum(len(w) for w in self.waiting.values())

    def waiting_on(self) -> set[str]:
        return {self.standard} if any(self.waiting.values()) else set()

    def admit(self, delivery: Delivery, item: Item, now: float) -> list[Item]:
        sequence = sequence_of(delivery)
        if sequence is None:
            return [item]
        # A queue is FIFO per publisher on each broker, not across a multi-broker's (pattern 9),
        # whose `spread: by_context` keeps a context's standard and priority events on one broker.
        publisher, n = f"{sequence[0]}@{delivery.broker}", sequence[1]
        if delivery.queue == self.standard:
            if n > self.routed.get(publisher, 0):
                self.routed[publisher] = n
            return [item, *self._freed(publisher)]
        after = delivery.headers.get(AFTER)
        if isinstance(after, int) and self.routed.get(publisher, 0) < after:
            self.waiting.setdefault(publisher, []).append((after, item, delivery, now))
            return []
        return [item]

    def _freed(self, publisher: str) -> list[Item]:
        waiters = self.waiting.get(publisher)
        if not waiters:
            return []
        high = self.routed.get(publisher, 0)
        freed = [item for after, item, _, _ in waiters if after <= high]
        if freed:
            kept = [entry for entry in waiters if entry[0] > high]
            if kept:
                self.waiting[publisher] = kept
            else:
                del self.waiting[publisher]
        return freed

    def reconnected(self) -> None:
        """Deliveries handed out before a reconnect come again: what their numbers said is void.

        Held events from before are dropped (the broker delivers them again); those from after
        keep waiting, now for fresh evidence: a standard event of the same publisher, or the sweep.
        The first of a publisher's standard events to arrive again says where its backlog begins,
        as after a restart.
        """
        self.routed.clear()
        for publisher in list(self.waiting):
            kept = [entry for entry in self.waiting[publisher] if not entry[2].stale]
            if kept:
                self.waiting[publisher] = kept
            else:
                del self.waiting[publisher]

    def drained(self, queue: str, before: float) -> list[Item]:
        """The standard queue had nothing ready and nothing arriving: release what waited since
        `before` (everything published to it earlier has reached the dispatcher)."""
        freed: list[Item] = []
        for publisher in list(self.waiting):
            waiters = self.waiting[publisher]
            freed += [item for _, item, _, held_at in waiters if held_at < before]
            kept = [entry for entry in waiters if entry[3] >= before]
            if kept:
                self.waiting[publisher] = kept
            else:
                del self.waiting[publisher]
        return freed
