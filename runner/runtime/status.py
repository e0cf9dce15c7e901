"""The status of a running pipeline as one JSON document: what `up` shows live, prints with `--json`
and broadcasts on `<pipeline>.status` for `edarun status`, and how the documents of several `up`s
(`--only` on several machines) merge into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson

from ..brokers import Broker, Message
from ..config.loader import LoadedPipeline
from ..patterns.flow import monitor_name
from ..patterns.priority import lane_rules
from ..redact import redact_url
from .app import queues_of
from .stats import ConsumerStats, RunStats

log = logging.getLogger("edarun.status")

STATUS_EVERY = 1.0  # seconds between two `up --json` lines, and between two broadcasts
RATE_WINDOW = 3.0  # seconds a consumer's rate is measured over
FORMAT = 1  # of the broadcast message: a listener skips a format it does not know
_COUNTS = ("processed", "failed", "retried", "repaired", "parked", "restarts", "consumers", "in_flight")


def status_exchange(pipeline: str) -> str:
    """The fanout exchange a running `up` says its status on, every STATUS_EVERY seconds."""
    return f"{pipeline}.status"


def source_id() -> str:
    """Which `up` a status comes from: the machine and the process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Rates:
    """processed/s per consumer over the last RATE_WINDOW seconds, from successive samples."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, int]]] = {}

    def rate(self, name: str, processed: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        window = self.samples.setdefault(name, [])
        window.append((now, processed))
        while len(window) > 2 and now - window[0][0] > RATE_WINDOW:
            window.pop(0)
        (t0, n0), (t1, n1) = window[0], window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def latency_ms(buckets: Sequence[int]) -> dict[str, float | None]:
    """p50 and p99 of the handler calls counted in `buckets` (bucket bounds: "at most"), in ms."""
    ms = ConsumerStats(handler_buckets=list(buckets)).handler_ms()
    return {"p50": ms["p50"], "p99": ms["p99"]}


class StatusBuilder:
    """Turns the run's counters into status documents; it keeps the samples the rates need."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        brokers: Sequence[str],
        *,
        only: Sequence[str] = (),
        source: str | None = None,
    ) -> None:
        model = loaded.model
        self.pipeline = model.name
        self.brokers = [redact_url(url) for url in brokers]
        self.source = source or source_id()
        self.lanes = {queue: rule.lane for queue, rule in lane_rules(model).items()}
        lanes = set(self.lanes.values())
        self.queues = [q for q in queues_of(loaded) if q not in lanes]
        self.targets = {name: p.targets for name, p in model.producers.items()}
        self.reads = {name: c.from_ for name, c in model.consumers.items()}
        # Flow state is known where this `up` runs the queue's flow monitor (pattern 8).
        self.flow = [
            q
            for q, spec in model.queues.items()
            if spec.flow_control is not None and (not only or monitor_name(q) in only)
        ]
        self.rates = Rates()

    def snapshot(self, stats: RunStats) -> dict[str, Any]:
        """The status document now (see docs/cli.md#status for its keys)."""
        queues: dict[str, dict[str, Any]] = {}
        for queue in self.queues:
            entry: dict[str, Any] = {
                "depth": stats.depth.get(queue, 0),
                "max_depth": stats.max_depth.get(queue, 0),
            }
            if queue in self.lanes:
                entry["lane_depth"] = stats.depth.get(self.lanes[queue], 0)
            if queue in self.flow:
                entry["flow"] = "slow" if stats.flow_state.get(queue) == "slow" else "normal"
            queues[queue] = entry
        consumers = {name: self._consumer(name, c) for name, c in stats.consumers.items()}
        return {
            "pipeline": self.pipeline,
            "from": "up",
            "sources": [self.source],
            "at": round(time.time(), 3),
            "elapsed_s": round(stats.elapsed, 3),
            "brokers": self.brokers,
            "producers": {
                name: {
                    "to": self.targets.get(name, []),
                    "published": p.published,
                    "rejected": p.rejected,
                    "delayed": p.delayed,
                    "done": p.done,
                }
                for name, p in stats.producers.items()
            },
            "queues": queues,
            "consumers": consumers,
            "parked": sum(c["parked"] for c in consumers.values()),
        }

    def _consumer(self, name: str, c: ConsumerStats) -> dict[str, Any]:
        return {
            "queue": self.reads.get(name),
            "consumers": c.consumers,
            "in_flight": c.in_flight,
            "processed": c.processed,
            "rate_per_s": round(self.rates.rate(name, c.processed), 1),
            "latency_ms": latency_ms(c.handler_buckets),
            "failed": c.failed,
            "retried": c.retried,
            "repaired": c.repaired,
            "parked": c.parked,
            "restarts": c.restarts,
        }

    def message(self, stats: RunStats) -> dict[str, Any]:
        """What `up` broadcasts: the document, plus the handler-duration buckets that let `status`
        merge the latencies of several `up`s exactly."""
        return {
            "format": FORMAT,
            "status": self.snapshot(stats),
            "buckets": {name: list(c.handler_buckets) for name, c in stats.consumers.items()},
        }


def merge(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from the broadcasts of several `up`s of one pipeline (one each): their
    services' counts add up; a queue's depth is the newest one's, its max depth the largest."""
    ordered = sorted(messages, key=lambda m: m["status"]["at"])
    docs = [m["status"] for m in ordered]
    merged: dict[str, Any] = {
        "pipeline": docs[-1]["pipeline"],
        "from": "up",
        "sources": [s for doc in docs for s in doc["sources"]],
        "at": docs[-1]["at"],
        "elapsed_s": max(doc["elapsed_s"] for doc in docs),
        "brokers": list(dict.fromkeys(url for doc in docs for url in doc["brokers"])),
        "producers": {},
        "queues": {},
        "consumers": {},
    }
    for doc in docs:
        for name, p in doc["producers"].items():
            into = merged["producers"].setdefault(name, {**p, "published": 0, "rejected": 0, "delayed": 0})
            for key in ("published", "rejected", "delayed"):
                into[key] += p[key]
            into["done"] = into["done"] and p["done"]
        for name, q in doc["queues"].items():  # oldest first: the newest depth wins
            into = merged["queues"].setdefault(name, {})
            max_depth = max(into.get("max_depth", 0), q["max_depth"])
            flow = q.get("flow", into.get("flow"))  # where a flow monitor runs
            into.update(q, max_depth=max_depth, **({"flow": flow} if flow is not None else {}))
    buckets: dict[str, list[int]] = {}
    for message, doc in zip(ordered, docs, strict=True):
        for name, c in doc["consumers"].items():
            into = merged["consumers"].setdefault(name, {**c, **dict.fromkeys(_COUNTS, 0), "rate_per_s": 0.0})
            for key in _COUNTS:
                into[key] += c[key]
            into["rate_per_s"] = round(into["rate_per_s"] + c["rate_per_s"], 1)
            theirs = message.get("buckets", {}).get(name, [])
            mine = buckets.setdefault(name, [0] * len(theirs))
            for index, count in enumerate(theirs[: len(mine)]):
                mine[index] += count
    for name, counts in buckets.items():
        merged["consumers"][name]["latency_ms"] = latency_ms(counts)
    merged["parked"] = sum(c["parked"] for c in merged["consumers"].values())
    return merged


class StatusBroadcaster:
    """Says this `up`'s status on `<pipeline>.status` every STATUS_EVERY seconds, best effort: a
    broadcast runs beside the run, one at a time, and one that fails or lags is skipped."""

    def __init__(self, broker: Broker, builder: StatusBuilder, every: float = STATUS_EVERY) -> None:
        self.broker = broker
        self.builder = builder
        self.every = every
        self.exchange = status_exchange(builder.pipeline)
        self._last = float("-inf")
        self._said = 0
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def offer(self, stats: RunStats) -> None:
        """The run's counters now: broadcast them if it is time and the last broadcast is done."""
        now = time.monotonic()
        if now - self._last < self.every or (self._task is not None and not self._task.done()):
            return
        self._last = now
        self._said += 1
        body = orjson.dumps(self.builder.message(stats))
        message = Message(body, f"{self.builder.source}-{self._said}", persistent=False)
        self._task = asyncio.create_task(self._send(message), name="status broadcast")

    async def _send(self, message: Message) -> None:
        try:
            await asyncio.wait_for(self.broker.broadcast(self.exchange, message), max(2 * self.every, 1.0))
        except Exception as exc:  # a status is a notice: the run goes on without it
            if not self._failing:
                log.debug("status not broadcast on %s: %s", self.exchange, exc)
            self._failing = True
        else:
            self._failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
