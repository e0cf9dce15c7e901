"""Counters of a run, owned by the services that count, read by the live view and the report."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProducerStats:
    published: int = 0
    rejected: int = 0
    confirmed: int = 0  # leading source events all settled: where a restart resumes
    delayed: int = 0  # events held back by flow control (pattern 8)
    flow_controlled: bool = False  # it publishes to a queue with flow_control: `delayed` is reported
    done: bool = False


# Upper bounds (seconds) of the handler-duration buckets; one more bucket holds what is slower. The
# same in every process, so a supervisor adds its services' counts bucket by bucket.
HANDLER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ConsumerStats:
    processed: int = 0
    priority: int = 0  # of processed: events from the priority lane (pattern 3)
    failed: int = 0
    retried: int = 0
    repaired: int = 0
    parked: int = 0
    consumers: int = 0
    max_consumers: int = 0
    restarts: int = 0
    in_flight: int = 0
    received: int = 0  # deliveries taken from the broker, redeliveries included
    held: int = 0  # deliveries received and not yet settled (the broker counts them unacked)
    pending_retries: int = 0
    duplicates: int = 0  # deliveries skipped by dedupe
    handler_seconds: float = 0.0  # the handler calls' time, summed (failed calls included)
    handler_calls: int = 0
    handler_buckets: list[int] = field(default_factory=lambda: [0] * (len(HANDLER_BUCKETS_S) + 1))

    def timed(self, seconds: float) -> None:
        """One handler call took `seconds` (for the latency of the live view, status and metrics)."""
        self.handler_seconds += seconds
        self.handler_calls += 1
        self.handler_buckets[bisect.bisect_left(HANDLER_BUCKETS_S, seconds)] += 1

    def handler_ms(self) -> dict[str, float | None]:
        """Mean, median and 99th percentile of the handler calls, in milliseconds (the percentiles
        are bucket bounds: "at most")."""

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None or seconds == float("inf") else round(seconds * 1000, 3)

        mean = self.handler_seconds / self.handler_calls if self.handler_calls else None
        return {"mean": ms(mean), "p50": ms(self.latency(0.5)), "p99": ms(self.latency(0.99))}

    def latency(self, quantile: float) -> float | None:
        """The handler duration below which `quantile` of the calls fell (a bucket's upper bound)."""
        total = sum(self.handler_buckets)
        if not total:
            return None
        seen = 0
        for index, count in enumerate(self.handler_buckets):
            seen += count
            if seen >= quantile * total:
                return HANDLER_BUCKETS_S[index] if index < len(HANDLER_BUCKETS_S) else float("inf")
        return float("inf")


@dataclass
class RunStats:
    pipeline: str
    started: float = field(default_factory=time.monotonic)
    producers: dict[str, ProducerStats] = field(default_factory=dict)
    consumers: dict[str, ConsumerStats] = field(default_factory=dict)
    max_depth: dict[str, int] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    flow: list[dict[str, Any]] = field(default_factory=list)  # flow-control changes, in order
    flow_state: dict[str, str] = field(default_factory=dict)  # queue → slow | resume, now
    started_at: float = field(default_factory=time.time)  # wall clock: to place a child's events
    parked_events: list[dict[str, Any]] = field(default_factory=list)
    reloads: list[dict[str, Any]] = field(default_factory=list)  # --reload: edits applied or refused

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def flow_changed(self, queue: str, state: str, depth: int, at: float | None = None) -> None:
        """Pattern 8: a flow monitor told the producers of `queue` to slow down or resume."""
        at = time.time() if at is None else at
        self.flow.append(
            {"queue": queue, "state": state, "at_s": round(at - self.started_at, 3), "depth": depth}
        )
        self.flow_state[queue] = state

    def reload_outcome(self, outcome: str, lines: list[str]) -> None:
        """--reload: an edit of the file was applied, or refused (invalid, or not live)."""
        at_s = round(time.time() - self.started_at, 3)
        self.reloads.append({"at_s": at_s, "outcome": outcome, "changes": lines})

    def observe_depth(self, queue: str, depth: int) -> None:
        self.depth[queue] = depth
        if depth >= self.max_depth.get(queue, 0):
            self.max_depth[queue] = depth

    def report(self, outcome: str) -> dict[str, Any]:
        """The `--report` document: SPEC §4 fields first, extra keys after."""
        return {
            "pipeline": self.pipeline,
            "elapsed_s": round(self.elapsed, 3),
            "producers": {
                name: {
                    "published": s.published,
                    "rejected": s.rejected,
                    **({"delayed": s.delayed} if s.flow_controlled else {}),
                }
                for name, s in self.producers.items()
            },
            "consumers": {
                name: {
                    "processed": s.processed,
                    "failed": s.failed,
                    "retried": s.retried,
                    "repaired": s.repaired,
                    "parked": s.parked,
                    "max_consumers": s.max_consumers,
                    "restarts": s.restarts,
                    "duplicates": s.duplicates,
                    "lanes": {"standard": s.processed - s.priority, "priority": s.priority},
                    **({"handler_ms": s.handler_ms()} if s.handler_calls else {}),
                }
                for name, s in self.consumers.items()
            },
            "queues": {name: {"max_depth": d} for name, d in sorted(self.max_depth.items())},
            "flow": self.flow,
            "outcome": outcome,
            "parked_events": self.parked_events,
            **({"reloads": self.reloads} if self.reloads else {}),
        }
