"""One service in its own OS process: what `edarun up` starts per producer and consumer on RabbitMQ.

The process runs the same runtime as a single-process run, restricted to one service, and tells
its supervisor how it is doing as one JSON line on stdout every few hundred milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import IO, Any

from ..config.loader import LoadedPipeline
from . import loop as event_loop
from .app import Runner, RunOptions
from .stats import RunStats

REPORT_EVERY = 0.2


class StatsLines:
    """A view that writes the run's counters as JSON lines, for the supervising process."""

    def __init__(self, out: IO[str], every: float = REPORT_EVERY) -> None:
        self.out = out
        self.every = every
        self.seq = 0
        self._last = 0.0
        self._parked_sent = 0
        self._flow_sent = 0

    def _write(self, stats: RunStats, *, final: bool, outcome: str | None = None) -> None:
        self.seq += 1
        parked = stats.parked_events[self._parked_sent :]
        self._parked_sent = len(stats.parked_events)
        # Flow-control changes (a monitor's), with the wall-clock time the supervisor places them by.
        flow = [{**f, "at": stats.started_at + f["at_s"]} for f in stats.flow[self._flow_sent :]]
        self._flow_sent = len(stats.flow)
        line: dict[str, Any] = {
            "seq": self.seq,
            "final": final,
            "producers": {n: dataclasses.asdict(s) for n, s in stats.producers.items()},
            "consumers": {n: dataclasses.asdict(s) for n, s in stats.consumers.items()},
            "parked": parked,
            "flow": flow,
        }
        if outcome is not None:
            line["outcome"] = outcome
        self.out.write(json.dumps(line, default=str) + "\n")
        self.out.flush()

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._write(stats, final=False)

    def close(self, stats: RunStats, outcome: str) -> None:
        self._write(stats, final=True, outcome=outcome)


def run_service(loaded: LoadedPipeline, name: str, options: RunOptions) -> int:
    """Run the producer, consumer or flow monitor `name` alone in this process; returns its exit code.

    A producer ends when its source is exhausted; a consumer runs until SIGTERM, then drains.
    """

    options.only = [name]
    options.until_idle = name in loaded.model.producers
    options.single_service = True
    options.view = StatsLines(sys.stdout)
    options.report = None
    # options.counters comes from the supervisor (--counters): the file it reads after a kill.
    return event_loop.run(Runner(loaded, options).run())
