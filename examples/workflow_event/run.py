"""Workflow event (pattern 7), the talk's way: see the issue, then apply the pattern.

The same 200 PLACE orders (plugins/workflow_demo.py's `trades`; ten have malformed shares: seven
read "<n> shares", three "about 742", "1297.5 shares" and "3.7k") go through trading:place_trade,
which rejects the malformed ones, in three pipelines, as `edarun up FILE --until-idle` would run
them:

1. retry.yaml (the issue): `on_error: retry(3)`, the default. A malformed trade fails the same way
   four times, with back-off in between, and is then parked: all ten need a person;
2. dead_letter.yaml (the issue, cheaper): parked at the first failure; still all ten need a person;
3. workflow.yaml (the pattern): `on_error: workflow(trading:repair_trade)`. The workflow processor
   repairs the "<n> shares" trades and resubmits them; only the three it cannot fix are parked.

Every number comes from the runs: processed, failed, retried, repaired and parked from each run's
report (`--report`, `consumers.trade-desk`), which trades needed a person from its
`parked_events`; where each repaired trade was placed among the handler calls from the third run's
traces (`--traces file(...)`). The `Trade fixed` lines are what trading:repair_trade logged.

    .venv/bin/python examples/workflow_event/run.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions
from runner.runtime.loop import run as run_loop
from runner.traces_view import load_traces

HERE = Path(__file__).resolve().parent
CONSUMER, PRODUCER, QUEUE = "trade-desk", "trade-feed", "new-trades"
DEADLINE_S = 20.0
WIDTH = 100


@dataclass(frozen=True)
class Scenario:
    key: str
    pipeline: str
    traced: bool = False  # the workflow run writes a traces file: when each handler call started


SCENARIOS = (
    Scenario("retry", "retry.yaml"),
    Scenario("dead letter", "dead_letter.yaml"),
    Scenario("workflow", "workflow.yaml", traced=True),
)


@dataclass
class Outcome:
    scenario: Scenario
    on_error: str  # the pipeline's consumers.trade-desk.on_error, in its compact form
    published: int  # report: producers.trade-feed.published
    counts: dict[str, Any]  # report: consumers.trade-desk
    parked: list[dict[str, Any]]  # report: parked_events
    elapsed: float  # report: elapsed_s
    logged: list[str]  # what the workflow processor's logger said (the repair's `Trade fixed` lines)
    late: list[Late]  # traces: each repaired trade's handler calls


@dataclass(frozen=True)
class Late:
    """A repaired trade, from its trace: where its two handler calls fell among all of them."""

    trade: str  # from the failed call's error: "TradeRejected: trade 5: …"
    first: int  # its failed call was the n-th handler call to start
    placed: int  # its repaired call (attempt 2) was the n-th
    between: int  # trades placed between the two


def late_arrivals(path: Path) -> list[Late]:
    """Each repaired trade of a traces file: its failed and its repaired `process new-trades` span."""
    traces = load_traces(path)
    calls = sorted(
        (s for spans in traces.values() for s in spans if s["name"] == f"process {QUEUE}"),
        key=lambda s: s["startTimeUnixNano"],
    )
    rank = {s["spanId"]: n for n, s in enumerate(calls, start=1)}
    ok = [rank[s["spanId"]] for s in calls if s["status"].get("code") != 2]  # 2: ERROR
    late = []
    for spans in traces.values():
        mine = [s for s in spans if s["name"] == f"process {QUEUE}"]
        failed = [s for s in mine if s["status"].get("code") == 2]
        repaired = [s for s in mine if s["attributes"].get("edarun.attempt") == 2]
        if not (failed and repaired):
            continue
        first, placed = rank[failed[0]["spanId"]], rank[repaired[0]["spanId"]]
        number = re.search(r"trade (\d+):", failed[0]["status"].get("message", ""))
        trade = number.group(1) if number else failed[0]["attributes"].get("messaging.message.id", "?")
        late.append(Late(trade, first, placed, sum(1 for n in ok if first < n < placed)))
    return sorted(late, key=lambda x: x.first)


class Journal(logging.Handler):
    """Keeps the INFO lines of one logger: the repair function logs through `ctx.log`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def compact(policy: Any) -> str:
    """An on_error policy as it would be written in the compact form."""
    if policy.action == "retry":
        return f"retry({policy.retries})"
    if policy.action == "workflow":
        return f"workflow({policy.repair}) attempts {policy.attempts}"
    return str(policy.action)


async def scenario(run: Scenario, report: Path) -> Outcome:
    loaded = load_pipeline(HERE / run.pipeline)
    traces = report.with_suffix(".traces.jsonl") if run.traced else None
    # The workflow processor's logger, `edarun.<consumer>.workflow`: the repair's ctx.log.
    logger = logging.getLogger(f"edarun.{CONSUMER}.workflow")
    journal, before = Journal(), (logger.level, logger.propagate)
    logger.addHandler(journal)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its parked warnings: the report has them
    try:
        options = RunOptions(until_idle=True, report=report, traces=f"file({traces})" if traces else None)
        runner = Runner(loaded, options)
        code = await asyncio.wait_for(runner.run(), DEADLINE_S)
    except TimeoutError:
        raise RuntimeError(f"the {run.key} run did not go idle within {DEADLINE_S:.0f}s") from None
    finally:
        logger.removeHandler(journal)
        logger.level, logger.propagate = before
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    return Outcome(
        scenario=run,
        on_error=compact(loaded.model.consumers[CONSUMER].on_error),
        published=summary["producers"][PRODUCER]["published"],
        counts=summary["consumers"][CONSUMER],
        parked=summary["parked_events"],
        elapsed=summary["elapsed_s"],
        logged=[line for line in journal.lines if line.startswith("Trade fixed")],
        late=await asyncio.to_thread(late_arrivals, traces) if traces else [],
    )


COLUMNS = (("run", -11), ("pipeline", -16), ("processed", 9), ("failed", 6), ("retried", 7),
           ("repaired", 8), ("parked", 6), ("idle after", 10))  # fmt: skip


def _row(values: tuple[str, ...]) -> str:
    cells = (f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))
    return "  ".join(cells).rstrip()


def table(outcomes: list[Outcome]) -> str:
    rows = [_row(tuple(heading for heading, _ in COLUMNS))]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        c = o.counts
        values = (o.scenario.key, o.scenario.pipeline, *(str(c[k]) for k in ("processed", "failed", "retried",
                  "repaired", "parked")), f"{o.elapsed:.2f} s")  # fmt: skip
        rows.append(_row(values))
    return "\n".join(rows)


def trade(record: dict[str, Any]) -> str:
    """A parked trade, from its record in the report: `68 D-945 SELL AAPL 'about 742'`."""
    event = record["event"]
    if not isinstance(event, dict):
        return repr(event)  # a body that did not decode is parked as it came
    fields = " ".join(str(event.get(k)) for k in ("account", "side", "symbol"))
    return f"{event.get('id')} {fields} {event.get('shares')!r}"


def needed_a_person(outcome: Outcome) -> str:
    ids = sorted(r["event"]["id"] for r in outcome.parked if isinstance(r["event"], dict))
    return f"{outcome.scenario.key:<11}  {len(outcome.parked):>2}: trades {', '.join(map(str, ids))}"


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH))


def held(outcomes: list[Outcome]) -> bool:
    """What the demo claims: every trade processed once or parked, none lost; the workflow parks
    fewer than the others, and each failure was either repaired or parked."""
    for o in outcomes:
        if o.counts["processed"] + o.counts["parked"] != o.published or len(o.parked) != o.counts["parked"]:
            return False
    retry, dead, workflow = outcomes
    repaired_or_parked = workflow.counts["repaired"] + workflow.counts["parked"] == workflow.counts["failed"]
    return repaired_or_parked and workflow.counts["parked"] < dead.counts["parked"] == retry.counts["parked"]


async def main() -> int:
    logging.getLogger("edarun").setLevel(logging.ERROR)  # the parked warnings: `edarun up`
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            outcome = await scenario(run, Path(tmp) / f"report-{len(outcomes)}.json")
            outcomes.append(outcome)
            print(
                f"== {run.key}: {run.pipeline}, on_error: {outcome.on_error}: {outcome.published} trades "
                f"published, idle after {outcome.elapsed:.2f}s"
            )
    retry, dead, workflow = outcomes

    print(f"\n{table(outcomes)}\n")
    print("Trades that needed a person (the report's parked_events):\n")
    for o in outcomes:
        print(needed_a_person(o))
    print("\nThe workflow run's repair function (trading:repair_trade), as it logged:\n")
    for line in workflow.logged:
        print(f"  {line}")
    print("\nThe repaired trades arrive late (the workflow run's traces, handler calls in start order):\n")
    print(f"  {'trade':>5}  {'failed at call':>14}  {'placed at call':>14}  {'trades placed in between':>24}")
    for x in workflow.late:
        print(f"  {x.trade:>5}  {x.first:>14}  {x.placed:>14}  {x.between:>24}")
    print("\nParked by the workflow run, with the error each carries to the dashboard:\n")
    for record in workflow.parked:
        print(f"  {trade(record)}: attempts {record['attempts']}")
        print(f"    {record['error']}")
    print()

    r, d, w = retry.counts, dead.counts, workflow.counts
    tries = r["failed"] // max(r["parked"], 1)
    say(
        f"retry(3): each of the {d['failed']} malformed trades failed the same way {tries} times "
        f"({r['failed']} failed calls, {r['retried']} retries; the run went idle after {retry.elapsed:.2f}s, "
        f"dead_letter's after {dead.elapsed:.2f}s), and all {r['parked']} were parked anyway. dead_letter "
        f"parks them at once: {d['parked']} for a person. With workflow(...) the repair fixed "
        f"{w['repaired']} and resubmitted them as attempt 2; {w['parked']} needed a person."
    )
    if workflow.late:
        calls = [x.placed for x in workflow.late]
        print()
        say(
            f"The price of the repair is order: the repaired trades were placed at handler calls "
            f"{min(calls)}-{max(calls)}, with up to {max(x.between for x in workflow.late)} other trades "
            "placed between a trade's failure and its repair (with `ordering`, later trades of its own "
            "account among them)."
        )
    return 0 if held(outcomes) else 1


if __name__ == "__main__":
    sys.exit(run_loop(main()))
