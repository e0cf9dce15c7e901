"""Ambulance and carpool (pattern 3), the talk's way: see the issue, then apply the pattern.

The talk's demo: eight messages in the order `S1 S2 S3 P1 S4 S5 S6 P2`, one every 500 ms, 2 s of
work each, here divided by SCALE (default 10: one every 50 ms, 200 ms of work; the source is
plugins/ambulance_demo.py's `talk_messages`). They go through three pipelines, as
`edarun up FILE --until-idle` would run them:

1. one_queue.yaml (the issue): one queue, one worker. P1 is processed 4th and P2 8th, behind
   every standard message sent before them (the talk: T=6000 ms and T=14000 ms);
2. carpool.yaml: `priority_lane: {when: "kind == 'priority'", mode: carpool, carpool: 1}` beside the
   one standard worker: a second worker serves only the lane, so P1 and P2 start as they arrive;
3. ambulance.yaml: `priority_lane: when(kind == 'priority')` with the same one worker, which takes
   from the lane first: P1 and P2 wait only for the message in progress when they arrived.

Every number comes from the runs: published, processed and each lane's count from each run's report
(`--report`); when each message was sent, started and finished, on which lane and worker, from what
the handler saw (plugins/ambulance_demo.py's journal). T is milliseconds since S1 was sent.

    .venv/bin/python examples/ambulance/run.py
    SCALE=1 .venv/bin/python examples/ambulance/run.py      # the talk's own pace: about a minute
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
from types import ModuleType
from typing import Any

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions
from runner.runtime.loop import run as run_loop

HERE = Path(__file__).resolve().parent
CONSUMER, PRODUCER = "message-processor", "talk-feed"
# The talk's figures (one queue, one thread, unscaled): quoted to compare, never used as results.
TALK_ONE_QUEUE = {"P1": (4, 6000), "P2": (8, 14000)}  # message → (processed n-th, at T ms)
TIMELINE = 40  # characters of the timeline column
WIDTH = 100


@dataclass(frozen=True)
class Scenario:
    key: str
    pipeline: str
    workers: str


SCENARIOS = (
    Scenario("one queue", "one_queue.yaml", "1 worker, no lane"),
    Scenario("carpool", "carpool.yaml", "1 + 1 carpool worker"),
    Scenario("ambulance", "ambulance.yaml", "1 worker, lane first"),
)


@dataclass
class Outcome:
    scenario: Scenario
    published: int  # report: producers.talk-feed.published
    processed: int  # report: consumers.message-processor.processed
    lanes: dict[str, int]  # report: consumers.message-processor.lanes
    elapsed: float  # report: elapsed_s
    entries: list[Any]  # journal: plugins/ambulance_demo.py's Entry, in the order they started

    @property
    def t0(self) -> float:
        """When S1 was sent (wall clock): T=0."""
        return min(e.sent_at for e in self.entries)

    def ms(self, at: float) -> float:
        return (at - self.t0) * 1000

    def entry(self, message: str) -> Any:
        return next(e for e in self.entries if e.id == message)

    def by_kind(self, kind: str) -> list[Any]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def last_finished(self) -> float:
        return max(self.ms(e.finished) for e in self.entries)


def demo_module(loaded: Any) -> ModuleType:
    """The handler's module, as the runner imported it from the plugin folder (its journal lives there)."""
    handler = loaded.resolve(loaded.model.consumers[CONSUMER].handler)
    module = inspect.getmodule(handler)
    assert module is not None
    return module


async def scenario(run: Scenario, report: Path, deadline: float) -> Outcome:
    loaded = load_pipeline(HERE / run.pipeline)
    journal = demo_module(loaded).journal
    journal.reset()
    runner = Runner(loaded, RunOptions(until_idle=True, report=report))
    try:
        code = await asyncio.wait_for(runner.run(), deadline)
    except TimeoutError:
        raise RuntimeError(f"the {run.key} run did not go idle within {deadline:.0f}s") from None
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    consumer = summary["consumers"][CONSUMER]
    return Outcome(
        scenario=run,
        published=summary["producers"][PRODUCER]["published"],
        processed=consumer["processed"],
        lanes=consumer["lanes"],
        elapsed=summary["elapsed_s"],
        entries=list(journal.entries),
    )


def bar(outcome: Outcome, entry: Any, span: float) -> str:
    """`.` while the message waited (sent → started), `#` while it was processed (started → finished)."""
    step = span / TIMELINE
    sent, started, finished = (outcome.ms(t) for t in (entry.sent_at, entry.started, entry.finished))
    cells = []
    for i in range(TIMELINE):
        mid = (i + 0.5) * step
        cells.append("#" if started <= mid < finished else "." if sent <= mid < started else " ")
    return "".join(cells).rstrip()


COLUMNS = (("#", 2), ("msg", -3), ("lane", -8), ("worker", 6), ("sent", 5), ("start", 5), ("finish", 6),
           ("waited", 6))  # fmt: skip


def _row(values: tuple[str, ...]) -> str:
    cells = (f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))
    return "  ".join(cells)


def timeline(outcome: Outcome, span: float) -> str:
    """The run's messages in the order they started, times in ms since S1 was sent."""
    heading = _row(tuple(name for name, _ in COLUMNS))
    scale = f"0 ms{f'{span:.0f} ms':>{TIMELINE - 4}}"
    rows = [f"{heading}  {scale}", "-" * (len(heading) + 2 + TIMELINE)]
    for e in outcome.entries:
        times = (outcome.ms(e.sent_at), outcome.ms(e.started), outcome.ms(e.finished), e.waited_ms)
        values = (str(e.position), str(e.id), e.lane, str(e.worker), *(f"{t:.0f}" for t in times))
        rows.append(f"{_row(values)}  {bar(outcome, e, span)}")
    return "\n".join(rows)


def summary(outcomes: list[Outcome]) -> str:
    head = (f"{'run':<10}  {'workers':<20}  {'P1':>4}  {'start':>5}  {'waited':>6}  {'P2':>4}  {'start':>5}  "
            f"{'waited':>6}  {'S waited max':>12}  {'all done':>8}")  # fmt: skip
    rows = [head, "-" * len(head)]
    for o in outcomes:
        p1, p2 = o.entry("P1"), o.entry("P2")
        cells = [f"{o.scenario.key:<10}", f"{o.scenario.workers:<20}"]
        for p in (p1, p2):
            cells += [f"{ordinal(p.position):>4}", f"{o.ms(p.started):>5.0f}", f"{p.waited_ms:>6.0f}"]
        cells += [f"{waited_most(o, 'standard'):>12.0f}", f"{o.last_finished:>8.0f}"]
        rows.append("  ".join(cells))
    return "\n".join(rows)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def waited_most(outcome: Outcome, kind: str) -> float:
    return max(e.waited_ms for e in outcome.by_kind(kind))


def in_send_order(entries: list[Any]) -> bool:
    """Did these messages start in the order they were sent?"""
    return [e.seq for e in entries] == sorted(e.seq for e in entries)


def lane_first(outcome: Outcome) -> bool:
    """Ambulance: no standard message started while a priority message was waiting."""
    priority = outcome.by_kind("priority")
    return not any(p.sent_at < s.started < p.started for s in outcome.by_kind("standard") for p in priority)


def held(one: Outcome, carpool: Outcome, ambulance: Outcome, *, messages: int, work_ms: float) -> bool:
    """What the demo claims: every message processed once, and each run served the lanes as it should."""
    for o in (one, carpool, ambulance):
        on_lane = sum(1 for e in o.entries if e.lane == "priority")
        if not o.processed == o.published == len(o.entries) == messages or o.lanes["priority"] != on_lane:
            return False
    if not (in_send_order(one.entries) and all(e.lane == "standard" for e in one.entries)):
        return False
    # Carpool: the priority messages start as they arrive, on a worker of their own.
    standard_workers = {e.worker for e in carpool.by_kind("standard")}
    carpooled = all(
        e.lane == "priority" and e.worker not in standard_workers and e.waited_ms < work_ms / 2
        for e in carpool.by_kind("priority")
    )
    # Ambulance: the lane first, and the standard messages still in the order they were sent.
    laned = all(e.lane == "priority" for e in ambulance.by_kind("priority")) and lane_first(ambulance)
    standard_in_order = all(in_send_order(o.by_kind("standard")) for o in (carpool, ambulance))
    return carpooled and laned and standard_in_order


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH))


async def main() -> int:
    logging.getLogger("edarun").setLevel(logging.ERROR)  # the handler's talk-like lines: `edarun up`
    module = demo_module(load_pipeline(HERE / SCENARIOS[0].pipeline))
    factor = module.scale()
    every, work = module.TALK_EVERY_MS / factor, module.TALK_WORK_MS / factor
    deadline = 10 + 2 * len(module.TALK_SEQUENCE) * work / 1000
    print(
        f"SCALE={factor:g}: {' '.join(module.TALK_SEQUENCE)}, one every {every:.0f} ms, {work:.0f} ms of "
        f"work each (the talk: {module.TALK_EVERY_MS} ms, {module.TALK_WORK_MS} ms)\n"
    )
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            outcome = await scenario(run, Path(tmp) / f"report-{len(outcomes)}.json", deadline)
            outcomes[run.key] = outcome
            print(
                f"== {run.key}: {run.pipeline}, {run.workers}: {outcome.processed} of {outcome.published} "
                f"messages (lanes: standard {outcome.lanes['standard']}, priority "
                f"{outcome.lanes['priority']}), idle after {outcome.elapsed:.2f}s"
            )
    one, carpool, ambulance = (outcomes[run.key] for run in SCENARIOS)
    span = max(o.last_finished for o in outcomes.values())

    for o in (one, carpool, ambulance):
        print(f"\n{o.scenario.key} ({o.scenario.pipeline}, {o.scenario.workers}), in the order started:\n")
        print(timeline(o, span))
    print("\nT in ms since S1 was sent; waited: start - sent; timeline: . waiting, # processing\n")
    print(summary([one, carpool, ambulance]))
    print()

    talk = ", ".join(f"{m} {ordinal(n)} at T={t} ms" for m, (n, t) in TALK_ONE_QUEUE.items())
    measured = ", ".join(
        f"{m} {ordinal(one.entry(m).position)} at T={one.ms(one.entry(m).started) * factor:.0f} ms"
        for m in TALK_ONE_QUEUE
    )
    say(f"One queue, one worker: the talk has {talk}. Measured here, times x{factor:g}: {measured}.")
    p1, p2 = carpool.entry("P1"), carpool.entry("P2")
    say(
        f"Carpool: P1 and P2 started {p1.waited_ms:.0f} and {p2.waited_ms:.0f} ms after they were sent, "
        f"on the carpool worker (worker {p1.worker}), while the standard worker took S1-S6 in order; the "
        f"standard messages waited at most {waited_most(carpool, 'standard'):.0f} ms "
        f"(one queue: {waited_most(one, 'standard'):.0f} ms): the lane has a "
        "worker of its own."
    )
    p1, p2 = ambulance.entry("P1"), ambulance.entry("P2")
    say(
        f"Ambulance: the same one worker took P1 {ordinal(p1.position)} and P2 {ordinal(p2.position)}, "
        f"after waiting {p1.waited_ms:.0f} and {p2.waited_ms:.0f} ms: only for the message in progress "
        f"when they arrived (at most {work:.0f} ms), never for the standard backlog. The standard messages "
        f"waited longer instead (at most {waited_most(ambulance, 'standard'):.0f} ms): "
        "no extra worker, the same work in another order."
    )

    return 0 if held(one, carpool, ambulance, messages=len(module.TALK_SEQUENCE), work_ms=work) else 1


if __name__ == "__main__":
    sys.exit(run_loop(main()))
