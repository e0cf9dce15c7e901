"""What `up` shows: the live table on a terminal and one line per change otherwise."""

from __future__ import annotations

import io

from rich.console import Console

from runner.runtime.live import LiveView, LogView
from runner.runtime.stats import ConsumerStats, ProducerStats, RunStats


def sample_stats() -> RunStats:
    stats = RunStats(pipeline="trading")
    stats.producers["trade-feed"] = ProducerStats(published=1000, rejected=2, done=True)
    stats.consumers["trade-processor"] = ConsumerStats(
        processed=990, failed=30, retried=20, parked=10, consumers=4
    )
    stats.observe_depth("trades", 12)
    return stats


def test_live_view_renders_a_table_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    view = LiveView(console)
    stats = sample_stats()
    view.update(stats)
    view.close(stats, "idle")
    text = out.getvalue()
    for needle in ("trade-feed", "trade-processor", "trades", "990", "parked", "idle after"):
        assert needle in text


def test_log_view_prints_a_line_per_change_only() -> None:
    out = io.StringIO()
    view = LogView(Console(file=out, width=300, color_system=None), every=0.0)
    stats = sample_stats()
    view.update(stats)
    view.update(stats)  # nothing changed: no second line
    stats.consumers["trade-processor"].processed += 1
    view.update(stats)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "trade-processor consumers=4 processed=990 failed=30 parked=10" in lines[0]
    assert "processed=991" in lines[1]
