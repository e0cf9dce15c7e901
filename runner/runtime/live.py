"""What `up` shows while it runs: a live rich view on a terminal, JSON lines with `--json`,
otherwise a log line per change; and the view `edarun status` prints."""

from __future__ import annotations

import json
import time
from typing import IO, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..redact import redact_text
from .stats import RunStats
from .status import STATUS_EVERY, StatusBuilder


def _count(value: Any) -> str:
    return "" if value is None else str(value)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


class _Grid(Table):
    def add_row(self, *cells: Any, **options: Any) -> None:
        # Names are the user's: never read as rich markup.
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **options)


def _table(*columns: str) -> Table:
    # Two spaces between columns (a separator and a right padding): 100 columns hold the widest.
    grid = _Grid(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    for column in columns:
        grid.add_column(column, justify="left" if column in _LEFT else "right", overflow="ellipsis")
    return grid


_LEFT = {"producer", "to", "state", "queue", "flow", "read by", "consumer"}


def render(status: dict[str, Any]) -> RenderableType:
    """A status document (runtime.status) as one view: a title line, then producers, queues (each
    with its priority lane and flow state) and consumers, in the order events flow through them."""
    parts: list[RenderableType] = [Text(_title(status), style="bold")]
    producers, queues, consumers = status["producers"], status["queues"], status["consumers"]
    if producers:
        slow = {q for q, entry in queues.items() if entry.get("flow") == "slow"}
        delayed = any(p["delayed"] for p in producers.values()) or any("flow" in q for q in queues.values())
        grid = _table("producer", "to", "state", "published", "rejected", *(["delayed"] if delayed else []))
        for name, p in producers.items():
            state = "exhausted" if p["done"] else "slowed" if slow & set(p["to"]) else "publishing"
            counts = [str(p["published"]), str(p["rejected"]), *([str(p["delayed"])] if delayed else [])]
            grid.add_row(name, ", ".join(p["to"]), state, *counts)
        parts += [grid, Text("")]
    if queues:
        readers: dict[str, list[str]] = {}
        for name, c in consumers.items():
            readers.setdefault(c.get("queue") or "", []).append(name)
            readers.setdefault(f"{name}.workflow", []).append("workflow processor")
        running = status["from"] == "up"  # the broker alone knows no max depth nor flow state
        grid = _table("queue", "depth", "lane", *(["max", "flow"] if running else []), "read by")
        for name, q in queues.items():
            flow = q.get("flow", "")
            row: list[Any] = [name + ("" if q.get("complete", True) else " (incomplete)"), str(q["depth"])]
            row.append(_count(q.get("lane_depth")))
            if running:
                row += [_count(q.get("max_depth")), Text(flow, style="bold red" if flow == "slow" else "")]
            grid.add_row(*row, ", ".join(readers.get(name, [])))
        parts += [grid, Text("")]
    if consumers and status["from"] == "broker":
        grid = _table("consumer", "parked")
        for name, c in consumers.items():
            grid.add_row(name, str(c["parked"]))
        parts.append(grid)
    elif consumers:
        # Repairs and restarts get a column once there are some: a new column draws the eye.
        repaired = ["repaired"] if any(c["repaired"] for c in consumers.values()) else []
        restarts = ["restarts"] if any(c["restarts"] for c in consumers.values()) else []
        columns = ["consumer", "consumers", "done", "per s", "p50 ms", "p99 ms", "failed", "retried"]
        grid = _table(*columns, *repaired, "parked", *restarts)
        for name, c in consumers.items():
            latency = c["latency_ms"]
            row = [name, str(c["consumers"]), str(c["processed"]), f"{c['rate_per_s']:.0f}"]
            row += [_ms(latency["p50"]), _ms(latency["p99"]), str(c["failed"]), str(c["retried"])]
            row += [str(c[key]) for key in (*repaired, "parked", *restarts)]
            grid.add_row(*row)
        parts.append(grid)
    return Group(*parts)


def _title(status: dict[str, Any]) -> str:
    brokers = ", ".join(status["brokers"])
    if status["from"] == "broker":
        return f"edarun · {status['pipeline']} · {brokers} · {status['note']} · parked {status['parked']}"
    sources = len(status["sources"])
    heard = f" · {sources} edarun up" if sources > 1 else ""
    elapsed = f"{status['elapsed_s']:.1f}s"
    return f"edarun · {status['pipeline']} · {elapsed} · {brokers}{heard} · parked {status['parked']}"


class LiveView:
    """A refreshing view on a terminal."""

    def __init__(self, console: Console, builder: StatusBuilder) -> None:
        self.console = console
        self.builder = builder
        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.live.start()
        self._last = 0.0

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            self.live.update(render(self.builder.snapshot(stats)))

    def close(self, stats: RunStats, outcome: str) -> None:
        self.live.update(render(self.builder.snapshot(stats)))
        self.live.stop()
        self.console.print(summary(stats, outcome))


class JsonView:
    """`up --json`: the status document as one JSON line every STATUS_EVERY seconds on `out`, and
    a last one with the outcome when `up` ends; the summary line goes to `console` (stderr)."""

    def __init__(
        self, out: IO[str], builder: StatusBuilder, console: Console, every: float = STATUS_EVERY
    ) -> None:
        self.out = out
        self.builder = builder
        self.console = console
        self.every = every
        self._last = float("-inf")

    def _write(self, document: dict[str, Any]) -> None:
        self.out.write(redact_text(json.dumps(document)) + "\n")
        self.out.flush()

    def update(self, stats: RunStats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._write(self.builder.snapshot(stats))

    def close(self, stats: RunStats, outcome: str) -> None:
        self._write({**self.builder.snapshot(stats), "outcome": outcome})
        self.console.print(summary(stats, outcome), markup=False, highlight=False, soft_wrap=True)


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
