"""Thread delegate (pattern 2), the talk's way: see the issue, then apply the pattern.

The same 400 trades (twenty accounts, each numbering its trades 1, 2, 3, … in publish order) go
through pipeline.yaml three times, as `edarun up pipeline.yaml --until-idle` would run it:

1. five consumers without ordering (the issue): more throughput, and an account's trades overtake
   each other;
2. five consumers with `ordering: by_context(account)` (the pattern): nearly the same throughput,
   and each account's trades are placed in publish order;
3. one consumer: order for free, throughput of one.

Every number comes from the runs: processed counts and `elapsed_s` from the run's report
(`--report`), the rest from what the handler saw (plugins/ordering_demo.py's journal), including
the table's seconds (first trade started to last trade placed).

    .venv/bin/python examples/thread_delegate/run.py
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

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions

PIPELINE = Path(__file__).resolve().parent / "pipeline.yaml"
CONSUMER, PRODUCER = "trade-placer", "trade-feed"
DEADLINE_S = 20.0
WIDTH = 100


@dataclass(frozen=True)
class Scenario:
    key: str
    ordering: str
    env: dict[str, str]


SCENARIOS = (
    Scenario("issue", "none", {"CONCURRENCY": "5", "ORDERING": "null"}),
    Scenario("pattern", "by_context(account)", {"CONCURRENCY": "5"}),
    Scenario("baseline", "none", {"CONCURRENCY": "1", "ORDERING": "null"}),
)


@dataclass
class Outcome:
    scenario: Scenario
    published: int  # report: producers.trade-feed.published
    processed: int  # report: consumers.trade-placer.processed
    elapsed: float  # report: elapsed_s (the whole run, to the idle check's 50 ms poll)
    seconds: float  # journal: first trade started -> last trade placed
    placed: dict[str, list[int]]  # journal: account -> seqs in the order the handler placed them
    violations: list[tuple[str, int, int]]  # journal: (account, seq, placed after this later seq)
    overlaps: int  # journal: an account on two workers at once
    cancel_misses: int  # journal: a cancel placed before the order it cancels
    moved: int  # journal: accounts placed by more than one worker over the run

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    @property
    def accounts_hit(self) -> int:
        return len({account for account, _, _ in self.violations})


async def scenario(run: Scenario, report: Path) -> Outcome:
    loaded = load_pipeline(PIPELINE, env=run.env)
    # The journal lives in the handler's module, as the runner imports it from the plugin folder.
    handler = loaded.resolve(loaded.model.consumers[CONSUMER].handler)
    journal = inspect.getmodule(handler).journal  # type: ignore[union-attr]
    journal.reset()
    runner = Runner(loaded, RunOptions(until_idle=True, report=report))
    try:
        code = await asyncio.wait_for(runner.run(), DEADLINE_S)
    except TimeoutError:
        raise RuntimeError(f"the {run.key} run did not go idle within {DEADLINE_S:.0f}s") from None
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    return Outcome(
        scenario=run,
        published=summary["producers"][PRODUCER]["published"],
        processed=summary["consumers"][CONSUMER]["processed"],
        elapsed=summary["elapsed_s"],
        seconds=journal.last_placed - journal.first_started,
        placed={account: list(seqs) for account, seqs in journal.placed.items()},
        violations=[(v.account, v.seq, v.after) for v in journal.violations],
        overlaps=journal.overlaps,
        cancel_misses=journal.cancel_misses,
        moved=sum(1 for workers in journal.workers.values() if len(workers) > 1),
    )


COLUMNS = (  # (heading, width): negative widths align left
    ("run", -8), ("consumers", 9), ("ordering", -19), ("seconds", 7), ("trades/s", 8), ("speed-up", 8),
    ("violations", 10), ("accounts", 8), ("overlaps", 8), ("cancels", 7),
)  # fmt: skip


def _row(values: tuple[str, ...]) -> str:
    cells = (f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))
    return "  ".join(cells)


def table(outcomes: list[Outcome]) -> str:
    baseline = next(o for o in outcomes if o.scenario.key == "baseline")
    rows = [_row(tuple(heading for heading, _ in COLUMNS))]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        rows.append(
            _row((
                o.scenario.key, o.scenario.env["CONCURRENCY"], o.scenario.ordering, f"{o.seconds:.2f}",
                f"{o.rate:.0f}", f"{o.rate / baseline.rate:.1f}x", str(len(o.violations)),
                str(o.accounts_hit), str(o.overlaps), str(o.cancel_misses),
            ))
        )  # fmt: skip
    return "\n".join(rows)


def placed_line(outcome: Outcome, account: str, limit: int = 16) -> str:
    seqs = outcome.placed.get(account, [])
    shown = " ".join(str(s) for s in seqs[:limit])
    return f"{outcome.scenario.key:>9}: {account} placed {shown}{' …' if len(seqs) > limit else ''}"


def _cancels(n: int) -> str:
    if n == 1:
        return "1 cancel reached the exchange before the order it cancels"
    return f"{n} cancels reached the exchange before the orders they cancel"


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH))


async def main() -> int:
    # The handler logs each order violation as a warning; the table below counts them instead.
    logging.getLogger("edarun").setLevel(logging.ERROR)
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            outcome = await scenario(run, Path(tmp) / f"report-{run.key}.json")
            outcomes[run.key] = outcome
            print(
                f"== {run.key}: concurrency {run.env['CONCURRENCY']}, ordering {run.ordering}: "
                f"{outcome.processed} of {outcome.published} trades, idle after {outcome.elapsed:.2f}s"
            )
    issue, pattern, single = outcomes["issue"], outcomes["pattern"], outcomes["baseline"]

    print(f"\n{table([issue, pattern, single])}\n")
    print("seconds: first trade started -> last trade placed; violations: trades placed after a later trade")
    print("of their account; accounts: accounts with one or more; overlaps: an account on two workers at")
    print("once; cancels: a cancel placed before the order it cancels\n")

    if issue.violations:
        worst = max(issue.placed, key=lambda a: sum(1 for v in issue.violations if v[0] == a))
        account, seq, after = next(v for v in issue.violations if v[0] == worst)
        print(f"The first trades of {worst}, in the order the handler placed them:")
        print(placed_line(issue, worst))
        print(placed_line(pattern, worst))
        print()
        say(
            f"Without ordering, {len(issue.violations)} of {issue.processed} trades were placed after a "
            f"later trade of their own account (e.g. {account} ({seq}) after ({after})), in "
            f"{issue.accounts_hit} of {len(issue.placed)} accounts, and {_cancels(issue.cancel_misses)}: "
            "five consumers take consecutive trades "
            "of one account and finish them in whatever order their I/O ends."
        )
    else:
        say("Without ordering, this run happened to place every account's trades in order (rare).")
    say(
        f"With ordering: {len(pattern.violations)} violations and {pattern.overlaps} overlaps, at "
        f"{pattern.rate:.0f} trades/s ({pattern.rate / issue.rate:.0%} of the unordered rate, "
        f"{pattern.rate / single.rate:.1f}x one consumer). An account is allocated to one worker while it "
        f"has trades in flight and released when the count drops to 0, so {pattern.moved} of "
        f"{len(pattern.placed)} accounts were placed by more than one worker over the run, never by two "
        f"at once."
    )
    held = pattern.processed == pattern.published and not pattern.violations and not pattern.overlaps
    held = held and pattern.cancel_misses == 0 and issue.processed == single.processed == pattern.processed
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
