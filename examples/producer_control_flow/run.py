"""Producer control flow (pattern 8), the talk's way: see the issue, then apply the pattern.

The same 1,500 trades (plugins/flow_demo.py's `trades`, 2,000 a second) go to one consumer that
places ~450 a second (2 ms a trade, one worker), in three runs, as `edarun up FILE --until-idle`
would run them:

1. no_flow_control.yaml (the issue): nothing slows the producer, so the queue grows as long as it
   publishes, and every trade waits behind the whole backlog;
2. flow_control.yaml (the pattern): `flow_control: upper 200 lower 100 delay 20ms every 100ms` on
   the queue: a flow monitor slows the producer down above 200 and resumes it at or below 100;
3. two_producers.yaml: the same trades from two producers of 1,000 a second each: both hear the
   monitor, each on a queue of its own bound to the control exchange.

Every number comes from the runs: published, processed, the broker's max depth (sampled by the
runner), the slow/resume changes and elapsed time from each run's report (`--report`); events
delayed from the run's producer counters (`Runner.stats`); the depth measured independently, from
when each trade was published and finished (plugins/flow_demo.py's journal: taken by a producer and
not finished yet, whether ready in the queue, prefetched or being placed), and each trade's wait
(handler start - the moment the producer took it).

    .venv/bin/python examples/producer_control_flow/run.py
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions
from runner.runtime.loop import run as run_loop

HERE = Path(__file__).resolve().parent
QUEUE, CONSUMER = "trade-orders", "trade-processor"
DEADLINE_S = 30.0
STEP_S = 0.25  # the depth timeline: one figure every STEP_S
WIDTH = 100


@dataclass(frozen=True)
class Scenario:
    key: str
    pipeline: str


SCENARIOS = (
    Scenario("issue", "no_flow_control.yaml"),
    Scenario("pattern", "flow_control.yaml"),
    Scenario("2 producers", "two_producers.yaml"),
)


@dataclass
class Outcome:
    scenario: Scenario
    published: int  # report: producers' published, summed
    processed: int  # report: consumers.trade-processor.processed
    report_depth: int  # report: queues.trade-orders.max_depth (the broker's ready count, sampled)
    flow: list[dict[str, Any]]  # report: flow
    elapsed: float  # report: elapsed_s
    delayed: dict[str, int]  # Runner.stats: producer -> events held back by flow control
    published_at: list[float]  # journal: when each trade was taken by a producer (monotonic)
    finished_at: list[float]  # journal: when each trade's handler finished (monotonic)
    waits: list[float]  # journal: handler start - sent_at, seconds

    def changes(self, state: str) -> int:
        return sum(1 for change in self.flow if change["state"] == state)

    @property
    def publishing_s(self) -> float:
        """From the first trade taken to the last: how long the producers took to publish."""
        return max(self.published_at) - min(self.published_at)

    @property
    def rate(self) -> float:
        """Trades published a second, all producers together."""
        return (len(self.published_at) - 1) / self.publishing_s if self.publishing_s else 0.0

    @property
    def placed_rate(self) -> float:
        """Trades placed a second by the consumer, from its first finish to its last."""
        span = max(self.finished_at) - min(self.finished_at)
        return (len(self.finished_at) - 1) / span if span else 0.0


def demo_module(loaded: Any) -> ModuleType:
    """The handler's module, as the runner imported it from the plugin folder (its journal lives there)."""
    module = inspect.getmodule(loaded.resolve(loaded.model.consumers[CONSUMER].handler))
    assert module is not None
    return module


async def scenario(run: Scenario, report: Path) -> tuple[Outcome, ModuleType]:
    loaded = load_pipeline(HERE / run.pipeline)
    module = demo_module(loaded)
    module.journal.reset()
    runner = Runner(loaded, RunOptions(until_idle=True, report=report))
    try:
        code = await asyncio.wait_for(runner.run(), DEADLINE_S)
    except TimeoutError:
        raise RuntimeError(f"the {run.key} run did not go idle within {DEADLINE_S:.0f}s") from None
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    journal = module.journal
    outcome = Outcome(
        scenario=run,
        published=sum(p["published"] for p in summary["producers"].values()),
        processed=summary["consumers"][CONSUMER]["processed"],
        report_depth=summary["queues"][QUEUE]["max_depth"],
        flow=summary["flow"],
        elapsed=summary["elapsed_s"],
        delayed={name: stats.delayed for name, stats in runner.stats.producers.items()},
        published_at=list(journal.published),
        finished_at=list(journal.finished),
        waits=list(journal.waits),
    )
    return outcome, module


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def depth_timeline(o: Outcome, until: float) -> list[int]:
    """The backlog (taken, not finished) every STEP_S from the first trade taken, to `until` seconds."""
    t0 = min(o.published_at)
    steps = [t0 + STEP_S * (i + 1) for i in range(int(until / STEP_S))]
    return [sum(t <= at for t in o.published_at) - sum(t <= at for t in o.finished_at) for at in steps]


COLUMNS = (("run", -11), ("producers", 9), ("pub/s", 5), ("max depth", 9), ("report", 6), ("slow", 4),
           ("resume", 6), ("delayed", 7), ("p50 ms", 6), ("max ms", 6), ("elapsed", 7),
           ("processed", 9))  # fmt: skip


def _row(values: tuple[str, ...]) -> str:
    cells = (f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))
    return "  ".join(cells).rstrip()


def table(outcomes: list[Outcome], depths: dict[str, int]) -> str:
    rows = [_row(tuple(heading for heading, _ in COLUMNS))]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        rows.append(
            _row((
                o.scenario.key, str(len(o.delayed)), f"{o.rate:.0f}", str(depths[o.scenario.key]),
                str(o.report_depth), str(o.changes("slow")), str(o.changes("resume")),
                str(sum(o.delayed.values())), f"{percentile(o.waits, 50) * 1000:.0f}",
                f"{max(o.waits) * 1000:.0f}", f"{o.elapsed:.2f}s", str(o.processed),
            ))
        )  # fmt: skip
    return "\n".join(rows)


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH, break_on_hyphens=False))


async def main() -> int:
    logging.getLogger("edarun").setLevel(logging.ERROR)  # the monitor's and producers' INFO lines
    outcomes: dict[str, Outcome] = {}
    depths: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            outcome, module = await scenario(run, Path(tmp) / f"report-{len(outcomes)}.json")
            outcomes[run.key] = outcome
            depths[run.key] = module.max_depth(outcome.published_at, outcome.finished_at)
            print(
                f"== {run.key}: {run.pipeline}: {outcome.processed} of {outcome.published} trades, "
                f"published in {outcome.publishing_s:.2f}s, idle after {outcome.elapsed:.2f}s"
            )
    issue, pattern, two = (outcomes[run.key] for run in SCENARIOS)

    print(f"\n{table([issue, pattern, two], depths)}\n")
    print(
        "pub/s: trades published a second; max depth: trades taken by a producer and not finished yet, at\n"
        "most, from publish and finish times; report: the report's max_depth (ready messages, sampled\n"
        "every 50 ms); slow, resume: the report's flow changes; delayed: events the producers held back;\n"
        "p50 ms, max ms: wait, handler start - taken by the producer; elapsed: the report's elapsed_s\n"
    )
    until = max(o.elapsed for o in outcomes.values())
    print(f"backlog every {STEP_S:g} s from the first trade (taken, not finished):")
    for o in (issue, pattern, two):
        print(f"  {o.scenario.key:<11}  {' '.join(f'{d:4d}' for d in depth_timeline(o, until))}")
    for change in pattern.flow[:4]:
        print(f"  pattern flow: {change['state']:<6} at {change['at_s']:.2f}s, depth {change['depth']}")
    print()

    say(
        f"Without flow control the producer publishes at {issue.rate:.0f} a second, the consumer places "
        f"{issue.placed_rate:.0f} a second, and the backlog grows as long as the producer runs: "
        f"{depths['issue']} trades at its deepest; the longest wait was {max(issue.waits):.1f}s."
    )
    say(
        f"With flow control the monitor slowed the producer {pattern.changes('slow')} times and resumed it "
        f"{pattern.changes('resume')} times; the backlog never went past {depths['pattern']} "
        f"(the report: {pattern.report_depth} ready at most), and no trade waited more than "
        f"{max(pattern.waits) * 1000:.0f} ms once taken. The cost: the producer published at "
        f"{pattern.rate:.0f} a second instead of {issue.rate:.0f}, and {sum(pattern.delayed.values())} "
        "trades were delayed; the consumer was the limit either way, so the run took as long "
        f"({pattern.elapsed:.2f}s against {issue.elapsed:.2f}s)."
    )
    delayed = ", ".join(f"{name} {count}" for name, count in two.delayed.items())
    say(
        f"Two producers: each has its own queue on the control exchange, so both were slowed "
        f"(delayed: {delayed}), and the backlog stayed at {depths['2 producers']} at most."
    )

    complete = all(o.processed == o.published == len(o.finished_at) for o in outcomes.values())
    flowed = all(
        [c["state"] for c in o.flow][:2] == ["slow", "resume"] and all(o.delayed.values())
        for o in (pattern, two)
    )
    bounded = max(depths["pattern"], depths["2 producers"]) * 2 < depths["issue"] and not issue.flow
    return 0 if complete and flowed and bounded else 1


if __name__ == "__main__":
    sys.exit(run_loop(main()))
