"""Supervisor consumer (pattern 5): `autoscale: depth/N max M` sizes a consumer to its queue.

Every `every` seconds the supervisor reads the queue's depth (ready messages, as the broker counts
them) and sets the number of consumers to clamp(ceil(load / N), min, max), where load is this
process's share of the depth (depth / instances) plus the deliveries it already holds (prefetched
messages leave the broker's ready count but are still work). It scales up at once; it scales down
once the target has stayed below the current count for `keep_alive`, and then only consumers that
are idle at that moment. A retiring consumer stops taking deliveries, returns what it prefetched and
finishes what it is running: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from ..brokers import Broker
from ..config.models import Autoscale

log = logging.getLogger("edarun.supervisor")


class Scalable(Protocol):
    @property
    def size(self) -> int: ...

    def start(self, count: int) -> None: ...

    def retire_idle(self, count: int, idle_for: float) -> int: ...

    def held(self) -> int: ...


def wanted(policy: Autoscale, depth: int, instances: int, held: int) -> int:
    """clamp(ceil(load / per), min, max) with load = depth / instances + held."""
    load = depth / max(instances, 1) + held
    return max(policy.min, min(policy.max, math.ceil(load / policy.per)))


class Supervisor:
    def __init__(
        self,
        policy: Autoscale,
        *,
        consumer: str,
        queues: list[str],
        broker: Broker,
        pool: Scalable,
        instances: int,
        decided: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.consumer = consumer
        self.queues = queues  # the queue and, when it has one, its priority lane
        self.broker = broker
        self.pool = pool
        self.instances = instances
        self.decided = decided  # (from, to, depth): for the report, the live view and traces
        self.stopping = asyncio.Event()
        self._tick = asyncio.Event()  # set to poll at once: a stop, or a new policy (--reload)
        self.below_since: float | None = None  # since when fewer consumers would do

    async def run(self) -> None:
        while not self.stopping.is_set():
            depth = 0
            for queue in self.queues:
                depth += (await self.broker.depth(queue)).ready
            self.adjust(depth)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), self.policy.every)
            self._tick.clear()

    def adjust(self, depth: int, now: float | None = None) -> int:
        pool, policy = self.pool, self.policy
        now = asyncio.get_running_loop().time() if now is None else now
        current = pool.size
        target = wanted(policy, depth, self.instances, pool.held())
        if target >= current:
            self.below_since = None
            if target > current:
                pool.start(target - current)  # scale up at once
        elif self.below_since is None:
            self.below_since = now
        # Light load keeps every consumer busy now and then (deliveries go round-robin), so the
        # wait is on the target, and the consumers retired are those idle right now.
        elif now - self.below_since >= policy.keep_alive and pool.retire_idle(current - target, 0.0):
            self.below_since = None
        after = pool.size
        if after != current:
            log.info("%s: %d → %d consumers (depth %d)", self.consumer, current, after, depth)
            if self.decided is not None:
                self.decided(current, after, depth)
        return after

    def apply_policy(self, policy: Autoscale) -> None:
        """New numbers (edarun up --reload): the next poll, at once, decides by them."""
        self.policy = policy
        self._tick.set()

    def stop(self) -> None:
        self.stopping.set()
        self._tick.set()


def describe_decision(before: int, after: int, depth: int) -> dict[str, Any]:
    return {"edarun.autoscale.from": before, "edarun.autoscale.to": after, "edarun.autoscale.depth": depth}
