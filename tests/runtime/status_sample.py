"""A pipeline with a lane, flow control and a workflow, and a run of it: for the status tests."""

from __future__ import annotations

from pathlib import Path

from runner.config.loader import LoadedPipeline, load_pipeline
from runner.runtime.stats import ConsumerStats, ProducerStats, RunStats

PIPELINE = """
version: 1
name: trading
plugins: [plugins]
queues:
  trades: {flow_control: upper 100 lower 50}
producers:
  feed: {source: "m:feed", to: trades}
consumers:
  processor:
    from: trades
    handler: "m:work"
    emit: confirmations
    priority_lane: true
    on_error: workflow(m:repair)
  settlement: {from: confirmations, handler: "m:work"}
"""


def loaded_pipeline(folder: Path, text: str = PIPELINE) -> LoadedPipeline:
    """The pipeline, loaded without its handlers (the status needs only its shape)."""
    (folder / "plugins").mkdir(exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return load_pipeline(path, check_refs=False)


def running_stats() -> RunStats:
    stats = RunStats(pipeline="trading")
    stats.producers["feed"] = ProducerStats(published=1000, rejected=2, delayed=40)
    processor = stats.consumers["processor"] = ConsumerStats(
        processed=990, failed=30, retried=20, repaired=5, parked=10, consumers=4, restarts=2, in_flight=3
    )
    for _ in range(98):
        processor.timed(0.003)
    processor.timed(0.2)
    processor.timed(0.2)
    stats.consumers["settlement"] = ConsumerStats(processed=985, consumers=1)
    for queue, depth in {"trades": 412, "trades.priority": 7, "confirmations": 0}.items():
        stats.observe_depth(queue, depth)
    stats.observe_depth("trades", 12)
    stats.flow_changed("trades", "slow", 412)
    return stats
