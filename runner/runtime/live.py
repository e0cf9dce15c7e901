"""What `up` shows while it runs: a live rich table on a terminal, otherwise a log line per change."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .stats import RunStats


class _Rates:
    """processed/s per consumer over the last few seconds."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, int]]] = {}

    def rate(self, name: str, processed: int) -> float:
        now = time.monotonic()
        window = self.samples.setdefault(name, [])
        window.append((now, processed))
        while len(window) > 2 and now - window[0][0] > 3.0:
            window.pop(0)
        (t0, n0), (t1, n1) = window[0], window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


_COLUMNS = (
    "service",
    "kind",
    "state",
    "depth",
    "consumers",
    "done",
    "per s",
    "failed",
    "retried",
    "parked",
    "restarts",
)
_LEFT = {"service", "kind", "state"}


def table(stats: RunStats, rates: _Rates) -> Table:
    grid = Table(title=f"edarun · {stats.pipeline} · {stats.elapsed:.1f}s", expand=False)
    for column in _COLUMNS:
        grid.add_column(column, justify="left" if column in _LEFT else "right")
    for name, p in stats.producers.items():
        state = "exhausted" if p.done else "publishing"
        if not p.done and p.delayed and "slow" in stats.flow_state.values():
            state = "slowed"
        grid.add_row(name, "producer", state, "", "", str(p.published), "", str(p.rejected), "", "", "")
    for name, c in stats.consumers.items():
        rate = f"{rates.rate(name, c.processed):.0f}"
        state = "in flight " + str(c.in_flight) if c.in_flight else ("idle" if c.consumers else "stopped")
        counts = (c.processed, c.failed, c.retried, c.parked, c.restarts)
        grid.add_row(
            name, "consumer", state, "", str(c.consumers), str(counts[0]), rate, *map(str, counts[1:])
        )
    for queue, depth in sorted(stats.depth.items()):
        flow = {"slow": "flow: slow down", "resume": "flow: normal"}.get(stats.flow_state.get(queue, ""), "")
        grid.add_row(queue, "queue", flow, str(depth), "", "", "", "", "", "", "")
    return grid


class LiveView:
    """A refreshing table on a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.rates = _Rates()
        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.live.start()
        self._last = 0.0

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            self.live.update(table(stats, self.rates))

    def close(self, stats: RunStats, outcome: str) -> None:
        self.live.update(table(stats, self.rates))
        self.live.stop()
        self.console.print(summary(stats, outcome))


class LogView:
    """One line per change, at most one a second: for logs, pipes and CI."""

    def __init__(self, console: Console, every: float = 1.0) -> None:
        self.console = console
        self.every = every
        self._last_line = ""
        self._last_at = 0.0
        self._stats_seen: Any = None

    def _line(self, stats: RunStats) -> str:
        parts = [
            f"{n} published={p.published} rejected={p.rejected}{' done' if p.done else ''}"
            for n, p in stats.producers.items()
        ]
        parts += [
            f"{n} consumers={c.consumers} processed={c.processed} failed={c.failed} parked={c.parked}"
            + (f" restarts={c.restarts}" if c.restarts else "")
            for n, c in stats.consumers.items()
        ]
        parts += [
            f"{q} depth={d}" + (f" flow={stats.flow_state[q]}" if q in stats.flow_state else "")
            for q, d in sorted(stats.depth.items())
        ]
        return " | ".join(parts)

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last_at < self.every:
            return
        line = self._line(stats)
        if line != self._last_line:
            self._last_line, self._last_at = line, now
            self.console.print(
                f"[{stats.elapsed:6.1f}s] {line}", markup=False, highlight=False, soft_wrap=True
            )

    def close(self, stats: RunStats, outcome: str) -> None:
        line = self._line(stats)
        if line != self._last_line:
            self.console.print(
                f"[{stats.elapsed:6.1f}s] {line}", markup=False, highlight=False, soft_wrap=True
            )
        self.console.print(summary(stats, outcome), markup=False, highlight=False, soft_wrap=True)


def summary(stats: RunStats, outcome: str) -> str:
    published = sum(p.published for p in stats.producers.values())
    rejected = sum(p.rejected for p in stats.producers.values())
    processed = sum(c.processed for c in stats.consumers.values())
    parked = sum(c.parked for c in stats.consumers.values())
    return (
        f"{stats.pipeline}: {outcome} after {stats.elapsed:.2f}s — published {published}, "
        + (f"rejected {rejected}, " if rejected else "")
        + f"processed {processed}, parked {parked}"
    )
