"""Contextual queue (pattern 6), the talk's way: see the issue, then apply the pattern.

The same 240 orders (plugins/contextual_demo.py's `rush`, 200 a second: book and music orders of
5 ms each, with two bursts of eight movie orders of 200 ms each) go through three runs, as
`edarun up FILE --until-idle` would run them:

1. one_queue.yaml, one consumer (the issue): every kind shares one queue and one service, so each
   burst of movies holds up every book and music order behind it;
2. one_queue.yaml, three consumers: as many workers as the pattern below, still one queue, so a
   burst of movies still takes all of them;
3. routed.yaml (the pattern): `route: {by: kind, …}` sends each order to the queue of its kind,
   each with its own service of one worker. The movies wait behind movies only;
4. routed.yaml with MOVIES=4: only the movie service gets four workers (a policy of its queue alone).

Every number comes from the runs: published and processed counts from each run's report
(`--report`), response times from what the handlers saw (plugins/contextual_demo.py's journal): an
order's handler start minus its `sent_at`, stamped by the source as the producer took it.

    .venv/bin/python examples/contextual_queue/run.py
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions
from runner.runtime.loop import run as run_loop

HERE = Path(__file__).resolve().parent
PRODUCER = "order-feed"
KINDS = ("book", "music", "movie")
DEADLINE_S = 20.0


@dataclass(frozen=True)
class Scenario:
    key: str
    pipeline: str
    queues: str
    env: dict[str, str]


SCENARIOS = (
    Scenario("issue", "one_queue.yaml", "all-orders", {"CONCURRENCY": "1"}),
    Scenario("issue x3", "one_queue.yaml", "all-orders", {"CONCURRENCY": "3"}),
    Scenario("pattern", "routed.yaml", "one per kind", {"MOVIES": "1"}),
    Scenario("pattern+", "routed.yaml", "one per kind", {"MOVIES": "4"}),
)


@dataclass
class Outcome:
    scenario: Scenario
    consumers: int  # the pipeline: workers over all its consumers
    published: int  # report: producers.order-feed.published
    rejected: int  # report: producers.order-feed.rejected
    processed: int  # report: the consumers' processed, summed
    elapsed: float  # report: elapsed_s
    waits: dict[str, list[float]]  # journal: kind -> each order's wait (s)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def scenario(run: Scenario, report: Path) -> Outcome:
    loaded = load_pipeline(HERE / run.pipeline, env=run.env)
    consumers = loaded.model.consumers
    # The journal lives in the handlers' module, as the runner imports it from the plugin folder.
    handler = loaded.resolve(next(iter(consumers.values())).handler)
    journal = inspect.getmodule(handler).journal  # type: ignore[union-attr]
    journal.reset()
    code = await Runner(loaded, RunOptions(until_idle=True, report=report)).run()
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    return Outcome(
        scenario=run,
        consumers=sum(c.concurrency or 1 for c in consumers.values()),
        published=summary["producers"][PRODUCER]["published"],
        rejected=summary["producers"][PRODUCER]["rejected"],
        processed=sum(c["processed"] for c in summary["consumers"].values()),
        elapsed=summary["elapsed_s"],
        waits={kind: list(waits) for kind, waits in journal.waits.items()},
    )


COLUMNS = (("run", -8), ("queues", -12), ("consumers", 9), ("kind", -5), ("orders", 6),
           ("p50 ms", 7), ("p99 ms", 7), ("max ms", 7))  # fmt: skip


def _row(values: tuple[str, ...]) -> str:
    cells = (f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))
    return "  ".join(cells).rstrip()


def table(outcomes: list[Outcome]) -> str:
    rows = [_row(tuple(heading for heading, _ in COLUMNS))]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        for kind in KINDS:
            waits = o.waits.get(kind, [])
            if not waits:
                continue
            rows.append(
                _row((
                    o.scenario.key, o.scenario.queues, str(o.consumers), kind, str(len(waits)),
                    f"{percentile(waits, 50) * 1000:.0f}", f"{percentile(waits, 99) * 1000:.0f}",
                    f"{max(waits) * 1000:.0f}",
                ))
            )  # fmt: skip
    return "\n".join(rows)


def p99(outcome: Outcome, *kinds: str) -> float:
    return percentile([w for kind in kinds for w in outcome.waits.get(kind, [])], 99)


async def main() -> int:
    logging.getLogger("edarun").setLevel(logging.ERROR)
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            outcome = await scenario(run, Path(tmp) / f"report-{len(outcomes)}.json")
            outcomes[run.key] = outcome
            print(
                f"== {run.key}: {run.pipeline}, {outcome.consumers} consumer(s): {outcome.processed} of "
                f"{outcome.published} orders, idle after {outcome.elapsed:.2f}s"
            )
    issue, wider, pattern, more = (outcomes[run.key] for run in SCENARIOS)

    print(f"\n{table([issue, wider, pattern, more])}\n")
    print("wait: handler start - sent_at (stamped by the source as the producer took the order)\n")
    fast = ("book", "music")
    print(
        f"Books and music, p99 wait: {p99(issue, *fast) * 1000:.0f} ms on one queue with one consumer, "
        f"{p99(wider, *fast) * 1000:.0f} ms with three,\n"
        f"{p99(pattern, *fast) * 1000:.0f} ms with a queue per kind (three consumers, one each). "
        f"Movies wait behind movies only: p99 {p99(pattern, 'movie') * 1000:.0f} ms,\n"
        f"with four workers on movie-orders alone, {p99(more, 'movie') * 1000:.0f} ms, and books and music "
        f"still {p99(more, *fast) * 1000:.0f} ms."
    )
    complete = all(o.processed == o.published and o.rejected == 0 for o in outcomes.values())
    held = complete and p99(pattern, *fast) < p99(wider, *fast) < p99(issue, *fast)
    held = held and p99(more, "movie") < p99(pattern, "movie")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(run_loop(main()))
