"""Producer control flow (pattern 8): `flow_control: upper U lower L [delay D] [every T]` on a queue.

A flow monitor polls the queue's depth (ready messages, its priority lane's included) every T. Above
U it tells every producer of the queue to slow down, a delay of D per event; at or below L, to resume.
The word travels over a fanout control exchange, `<queue>.control`, to which each producer binds a
queue of its own: not a shared variable, not one shared queue. The monitor says the current state on
every poll, not only when it changes, so:

- a producer that starts learns the state within T, and waits for it before its first publish;
- a monitor that restarts re-announces the state it finds, so no producer stays slowed after a
  monitor crash;
- a producer that hears nothing for a while (the monitor is gone) goes back to full speed with a
  warning: producers never stop, and without a monitor there is no one to say when to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..brokers import Broker, BrokerError, Message, Subscription
from ..config.models import FlowControl

log = logging.getLogger("edarun.flow")

SLOW, NORMAL = "slow", "normal"
MONITOR_SUFFIX = ".flow"  # a monitor's service name: `<queue>.flow`


def control_exchange(queue: str) -> str:
    return f"{queue}.control"


def monitor_name(queue: str) -> str:
    return queue + MONITOR_SUFFIX


def silence_limit(policy: FlowControl) -> float:
    """How long a producer believes a state without hearing it again."""
    return max(5 * policy.every, 3.0)


class FlowMonitor:
    """Watches one queue and tells its producers to slow down or resume."""

    def __init__(
        self,
        queue: str,
        policy: FlowControl,
        *,
        broker: Broker,
        measured: list[str],
        changed: Callable[[str, str, int], None] | None = None,
        restarted: bool = False,
    ) -> None:
        self.queue = queue
        self.policy = policy
        self.broker = broker
        self.measured = measured  # the queue and, when it has one, its priority lane
        self.changed = changed  # (queue, state, depth): for the report, the live view and traces
        # A monitor started again after a crash: its first word may resume producers left slowed,
        # so it counts as a change even when it says "normal".
        self.restarted = restarted
        self.state = NORMAL
        self.depth = 0
        self.stopping = asyncio.Event()
        self._tick = asyncio.Event()  # set to poll at once: a stop, or a new policy (--reload)
        self._id = os.urandom(4).hex()
        self._said = 0

    async def run(self) -> None:
        first = True
        while not self.stopping.is_set():
            depth = 0
            for queue in self.measured:
                depth += (await self.broker.depth(queue)).ready
            self.depth = depth
            state = self.decide(depth)
            if state != self.state or first:
                if state != self.state or (first and self.restarted):
                    log.info(
                        "%s: depth %d, producers %s",
                        self.queue,
                        depth,
                        "slowed" if state == SLOW else "resumed",
                    )
                    if self.changed is not None:
                        self.changed(self.queue, state, depth)
                self.state = state
                first = False
            await self._announce()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), self.policy.every)
            self._tick.clear()

    def decide(self, depth: int) -> str:
        if self.state == NORMAL and depth > self.policy.upper:
            return SLOW
        if self.state == SLOW and depth <= self.policy.resume_at:
            return NORMAL
        return self.state

    async def _announce(self) -> None:
        self._said += 1
        body = orjson.dumps({
            "queue": self.queue, "state": self.state, "delay": self.policy.delay, "depth": self.depth,
            "monitor": self._id, "said": self._said, "at": time.time(),
        })  # fmt: skip
        try:
            await self.broker.broadcast(
                control_exchange(self.queue), Message(body, f"{self._id}-{self._said}")
            )
        except BrokerError as exc:
            log.warning(
                "%s: flow state not announced (%s); trying again in %.2fs", self.queue, exc, self.policy.every
            )

    def apply_policy(self, policy: FlowControl) -> None:
        """New thresholds (edarun up --reload): the next poll decides by them, and the next word
        tells producers the new delay."""
        if policy != self.policy:
            log.info("%s: flow control now %s", self.queue, _describe(policy))
            self.policy = policy
            self._tick.set()  # decide by it now, not after the old interval

    def stop(self) -> None:
        self.stopping.set()
        self._tick.set()


def _describe(policy: FlowControl) -> str:
    return f"upper {policy.upper} lower {policy.resume_at} delay {policy.delay:g}s every {policy.every:g}s"


class FlowListener:
    """A producer's view of one flow-controlled queue: the delay to add to each event now."""

    def __init__(self, queue: str, policy: FlowControl, *, producer: str) -> None:
        self.queue = queue
        self.policy = policy
        self.producer = producer
        self.state = NORMAL
        self.said_delay: float | None = None  # the delay the monitor says: its policy is current
        self.heard_at: float | None = None  # loop time of the last word from a monitor
        self.heard = asyncio.Event()
        self.subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    async def start(self, broker: Broker) -> None:
        self.subscription = await broker.listen(control_exchange(self.queue))
        self._task = asyncio.create_task(self._follow(), name=f"{self.producer} flow {self.queue}")

    async def _follow(self) -> None:
        assert self.subscription is not None
        loop = asyncio.get_running_loop()
        async for delivery in self.subscription:
            await delivery.ack()
            try:
                word: Any = orjson.loads(delivery.body)
                state = word["state"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not a flow word: nothing to change
            if state not in (SLOW, NORMAL):
                continue
            if state != self.state:
                log.info(
                    "%s: %s by the flow monitor of %s",
                    self.producer,
                    "slowed" if state == SLOW else "resumed",
                    self.queue,
                )
            self.state = state
            delay = word.get("delay")
            self.said_delay = float(delay) if isinstance(delay, int | float) and delay >= 0 else None
            self.heard_at = loop.time()
            self._warned = False
            self.heard.set()

    async def ready(self) -> None:
        """Before the first publish: wait for the monitor to say the state (at most a while)."""
        try:
            await asyncio.wait_for(self.heard.wait(), silence_limit(self.policy))
        except TimeoutError:
            log.warning(
                "%s: no flow monitor of %s answered within %.1fs; publishing at full speed until one does",
                self.producer, self.queue, silence_limit(self.policy),
            )  # fmt: skip

    def delay(self) -> float:
        """The delay for the next event: D while slowed, unless the monitor has gone silent."""
        if self.state != SLOW:
            return 0.0
        heard_at = self.heard_at
        if heard_at is not None and asyncio.get_running_loop().time() - heard_at > silence_limit(self.policy):
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: the flow monitor of %s went silent; back to full speed", self.producer, self.queue
                )
            return 0.0
        return self.policy.delay if self.said_delay is None else self.said_delay

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.subscription is not None:
            await self.subscription.close()
