"""Event forwarding (pattern 1), the talk's way: see the issue, then apply the pattern.

The same pipeline (pipeline.yaml) runs twice, as `edarun up pipeline.yaml --until-idle` would run
it: once with `delivery: at_most_once` (acknowledge on receipt, the issue) and once with
`delivery: at_least_once` (acknowledge after the commit, the pattern). Each time, 200 orders are
published and the consumer dies three times in the middle of an order. Every number in the table
comes from the run: the run's report (`--report`) and the ledger (the database).

    .venv/bin/python examples/event_forwarding/run.py

How the crash is simulated: the handler (order_service.py) raises `SystemExit` ("the consumer
process died") at three chosen points, once each, just before it would commit an order. edarun
treats a handler that raises `SystemExit` (or any other BaseException) as a crashed worker, not as a
failed event: `on_error` does not see it, nothing after that point runs (no commit, no
acknowledgement), the worker's broker subscription is closed as the broker closes a dead
connection's channel, and the worker is restarted with back-off (the report's `restarts`).
What the worker held and had not acknowledged goes back to the queue, marked redelivered.

What this shows, honestly: the "process" that dies is one of the consumer's eight workers, and the
`memory` broker hands a worker its deliveries one at a time, as it asks for them. A dead worker
therefore holds exactly one delivery, the order it was handling: `at_most_once` loses exactly that
order per crash, and `at_least_once` gets exactly that order back. On RabbitMQ with a prefetch
window, a killed process also holds the deliveries it fetched but had not started: `at_most_once`
(auto-acknowledge) loses the whole window, and `at_least_once` gets the whole window back. That
is shown for real, with `kill -9` of an `edarun up` process, once the RabbitMQ broker lands.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions

PIPELINE = Path(__file__).resolve().parent / "pipeline.yaml"
CONSUMER, PRODUCER = "order-processor", "order-feed"
# The consumer dies once when the ledger holds this many commits. The points sit in the first half
# of the run, and each hits a different worker (order_service.Ledger.crash_due), so every restart
# back-off (0.1 s) ends while there is still work: a worker still in its back-off when the run goes
# idle is not stopped by the runtime's drain, and the run would not end.
CRASH_AT = (30, 60, 90)
DEADLINE_S = 20.0
WIDTH = 96


@dataclass
class Outcome:
    delivery: str
    published: int  # report: producers.order-feed.published
    committed: int  # ledger: distinct orders committed
    lost: int  # published but never committed
    redelivered: int  # ledger: handler calls with ctx.redelivered set
    duplicates: int  # ledger: commits beyond the first of an order
    restarts: int  # report: consumers.order-processor.restarts
    crashes: list[Any]  # order_service.Crash: where the handler died
    commits: dict[str, int]  # ledger: order id -> times committed
    redelivered_ids: list[str]
    seconds: float  # report: elapsed_s


async def scenario(delivery: str, report: Path) -> Outcome:
    loaded = load_pipeline(PIPELINE, env={"DELIVERY": delivery})
    # The ledger lives in the handler's module, as the runner imports it from the plugin folder.
    handler = loaded.resolve(loaded.model.consumers[CONSUMER].handler)
    ledger = inspect.getmodule(handler).ledger  # type: ignore[union-attr]
    ledger.reset(crash_at=CRASH_AT)  # a fresh database, and the crash points armed again

    runner = Runner(loaded, RunOptions(until_idle=True, report=report))
    try:
        code = await asyncio.wait_for(runner.run(), DEADLINE_S)
    except TimeoutError:
        raise RuntimeError(f"the {delivery} run did not go idle within {DEADLINE_S:.0f}s") from None
    if code != 0:
        raise RuntimeError(f"the run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    published = summary["producers"][PRODUCER]["published"]
    commits = dict(ledger.commits)
    return Outcome(
        delivery=delivery,
        published=published,
        committed=len(commits),
        lost=published - len(commits),
        redelivered=len(ledger.redelivered),
        duplicates=sum(n - 1 for n in commits.values()),
        restarts=summary["consumers"][CONSUMER]["restarts"],
        crashes=list(ledger.crashes),
        commits=commits,
        redelivered_ids=sorted(ledger.redelivered),
        seconds=summary["elapsed_s"],
    )


def _orders(n: int) -> str:
    return f"{n} order" if n == 1 else f"{n} orders"


def _fate(outcome: Outcome, order: str) -> str:
    times = outcome.commits.get(order, 0)
    if times == 0:
        return "lost: acknowledged on receipt, never committed"
    again = "redelivered, then " if order in outcome.redelivered_ids else ""
    return f"{again}committed {'once' if times == 1 else f'{times} times'}"


def table(outcomes: list[Outcome]) -> str:
    columns = ("published", "committed", "lost", "redelivered", "duplicates", "restarts")
    label = {"at_most_once": "at_most_once  (issue)", "at_least_once": "at_least_once (pattern)"}
    rows = [f"{'delivery':<24}" + "".join(f"{c:>12}" for c in columns)]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        values = (o.published, o.committed, o.lost, o.redelivered, o.duplicates, o.restarts)
        rows.append(f"{label[o.delivery]:<24}" + "".join(f"{v:>12}" for v in values))
    return "\n".join(rows)


async def main() -> int:
    # The runtime's own log line for each crash ("worker N crashed (SystemExit: …); restarting").
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="  edarun: %(message)s")
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for delivery, title in (
            ("at_most_once", "the issue: acknowledge on receipt"),
            ("at_least_once", "the pattern: acknowledge after the database commit"),
        ):
            print(f"\n== delivery: {delivery} — {title}")
            outcome = await scenario(delivery, Path(tmp) / f"report-{delivery}.json")
            for crash in outcome.crashes:
                print(
                    f"  worker {crash.worker} died after {crash.after_commits} commits, handling "
                    f"{crash.order}: {_fate(outcome, crash.order)}"
                )
            print(f"  idle after {outcome.seconds:.2f}s")
            outcomes.append(outcome)
    issue, pattern = outcomes
    print(f"\n{table(outcomes)}\n")
    print(
        textwrap.fill(
            f"at_most_once: the consumer died {len(issue.crashes)} times; each time the order it "
            f"held had been acknowledged on receipt, so the broker had nothing to give back: "
            f"{_orders(issue.lost)} never reached the database.",
            WIDTH,
        )
    )
    print(
        textwrap.fill(
            f"at_least_once: the consumer died {len(pattern.crashes)} times; the orders it held were "
            f"not acknowledged, so the broker delivered them again marked redelivered "
            f"({', '.join(pattern.redelivered_ids) or 'none'}): {_orders(pattern.lost)} lost.",
            WIDTH,
        )
    )
    if pattern.duplicates:
        print(
            textwrap.fill(
                f"{_orders(pattern.duplicates)} committed more than once: the pattern's trade-off, "
                "which an idempotent consumer (dedupe) absorbs.",
                WIDTH,
                initial_indent="  ",
                subsequent_indent="  ",
            )
        )
    # The demo's claims: every crash point fired, the issue lost the order in the handler at each
    # crash (the memory broker hands out one delivery at a time), and the pattern lost nothing.
    held = all(len(o.crashes) == len(CRASH_AT) for o in outcomes)
    held = held and issue.lost == len(issue.crashes) and pattern.lost == 0
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
