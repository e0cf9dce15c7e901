"""What `up` shows: the live view on a terminal, JSON lines with --json, one line per change
otherwise."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from status_sample import loaded_pipeline, running_stats

from runner.runtime.live import JsonView, LiveView, LogView
from runner.runtime.stats import ConsumerStats, ProducerStats, RunStats
from runner.runtime.status import StatusBuilder


def sample_stats() -> RunStats:
    stats = RunStats(pipeline="trading")
    stats.producers["trade-feed"] = ProducerStats(published=1000, rejected=2, done=True)
    stats.consumers["trade-processor"] = ConsumerStats(
        processed=990, failed=30, retried=20, parked=10, consumers=4
    )
    stats.observe_depth("trades", 12)
    return stats


def rows(text: str) -> dict[str, list[str]]:
    """The rendered view's lines by their first word (a producer, queue or consumer name)."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


def test_live_view_shows_queues_lanes_flow_and_consumers_in_100_columns(tmp_path: Path) -> None:
    console = Console(record=True, width=100, force_terminal=True, color_system=None, file=io.StringIO())
    builder = StatusBuilder(loaded_pipeline(tmp_path), ["amqp://bob:hunter2@rabbit:5672/"])
    view = LiveView(console, builder)
    stats = running_stats()
    view.update(stats)
    view.close(stats, "interrupted")
    text = console.export_text()
    assert "hunter2" not in text
    assert "edarun · trading · " in text and "amqp://bob:***@rabbit:5672/ · parked 10" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    table = rows(text.split("trading: interrupted after")[0].split("edarun · trading")[-1])
    # the producer: slowed by the flow monitor of its queue
    assert table["feed"] == ["feed", "trades", "slowed", "1000", "2", "40"]
    # each queue: depth, its priority lane's depth, max depth, flow state, who reads it
    assert table["queue"] == ["queue", "depth", "lane", "max", "flow", "read", "by"]
    assert table["trades"] == ["trades", "12", "7", "412", "slow", "processor"]
    assert table["confirmations"] == ["confirmations", "0", "0", "settlement"]
    assert table["processor.workflow"] == ["processor.workflow", "0", "0", "workflow", "processor"]
    # each consumer: count, processed, rate, latency p50/p99, failures, repairs, parked, restarts
    header = "consumer consumers done per s p50 ms p99 ms failed retried repaired parked restarts"
    assert " ".join(table["consumer"]) == header
    assert table["processor"] == ["processor", "4", "990", "0", "5", "250", "30", "20", "5", "10", "2"]
    assert table["settlement"] == ["settlement", "1", "985", "0", "0", "0", "0", "0", "0"]
    assert "trading: interrupted after" in text and "processed 1975, parked 10" in text


def test_json_view_prints_the_status_every_second_and_at_the_end(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    builder = StatusBuilder(loaded_pipeline(tmp_path), ["memory"])
    view = JsonView(out, builder, Console(file=err, width=200), every=3600.0)
    stats = running_stats()
    view.update(stats)
    view.update(stats)  # within the second: no line
    view.close(stats, "idle")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    assert lines[0]["queues"]["trades"]["lane_depth"] == 7 and "outcome" not in lines[0]
    assert lines[1]["outcome"] == "idle" and lines[1]["consumers"]["processor"]["restarts"] == 2
    assert "trading: idle after" in err.getvalue()


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
