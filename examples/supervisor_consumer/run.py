"""Supervisor consumer (pattern 5), the talk's way: see the issue, then apply the pattern.

The same 1,500 `get name for customer id <k>` requests (40 at 40/s, a burst of 1,440 in about half
a second, then 20 at 4/s; each answer takes ~10 ms) go through pipeline.yaml twice, as
`edarun up pipeline.yaml --until-idle` would run it:

1. one fixed consumer (the issue): fine for the trickle, and the burst waits in the queue;
2. `autoscale: depth/20 max 16 min 1 every 250ms keep_alive 2s` (the pattern): the supervisor adds
   consumers as the queue deepens and retires idle ones afterwards.

Response time is the moment the handler answered minus `sent_at`, which the source stamps on each
request (plugins/supervisor_demo.py). While a run goes on, a sampler reads the runner's live
counters (`runner.stats`: consumers and queue depth) every 100 ms. Max consumers and elapsed come
from the run's report (`--report`). Nothing in the table is written by hand.

    .venv/bin/python examples/supervisor_consumer/run.py
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from runner.config.loader import load_pipeline
from runner.runtime.app import Runner, RunOptions

PIPELINE = Path(__file__).resolve().parent / "pipeline.yaml"
CONSUMER, PRODUCER, QUEUE = "customer-lookup", "request-feed", "demo-requests"
SAMPLE_EVERY = 0.1
DEADLINE_S = 30.0
WIDTH = 100


@dataclass(frozen=True)
class Scenario:
    key: str
    sizing: str
    env: dict[str, str]


SCENARIOS = (
    Scenario("fixed", "concurrency: 1", {"CONCURRENCY": "1", "AUTOSCALE": "null"}),
    Scenario("autoscale", "depth/20 max 16 min 1 every 250ms keep_alive 2s", {}),
)


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the run started
    consumers: int
    depth: int


@dataclass
class Outcome:
    scenario: Scenario
    published: int  # report
    processed: int  # report
    max_consumers: int  # report
    seconds: float  # report: elapsed_s
    response: list[float]  # handler: answered - sent_at, seconds, every request
    burst_served: float  # handler: last burst request answered - first burst request sent
    samples: list[Sample]  # sampler
    quiet_rate: float  # the source's last phase, requests per second

    def percentile(self, p: float) -> float:
        ordered = sorted(self.response)
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    def changes(self) -> list[tuple[float, int, int, int]]:
        """(at, from, to, depth) for each change of the consumer count the sampler saw."""
        found, before = [], None
        for s in self.samples:
            if s.consumers and before is not None and s.consumers != before:
                found.append((s.at, before, s.consumers, s.depth))
            if s.consumers:
                before = s.consumers
        return found


async def sample(runner: Runner, started: float, into: list[Sample], stop: asyncio.Event) -> None:
    while not stop.is_set():
        stats = runner.stats.consumers.get(CONSUMER)
        if stats is not None:
            depth = runner.stats.depth.get(QUEUE, 0)
            into.append(Sample(time.monotonic() - started, stats.consumers, depth))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def scenario(run: Scenario, report: Path) -> Outcome:
    loaded = load_pipeline(PIPELINE, env=run.env)
    # The responses live in the handler's module, as the runner imports it from the plugin folder.
    handler = loaded.resolve(loaded.model.consumers[CONSUMER].handler)
    module = inspect.getmodule(handler)
    responses = module.responses  # type: ignore[union-attr]
    responses.reset()
    runner = Runner(loaded, RunOptions(until_idle=True, report=report))
    samples: list[Sample] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(runner, time.monotonic(), samples, stop))
    try:
        code = await asyncio.wait_for(runner.run(), DEADLINE_S)
    except TimeoutError:
        raise RuntimeError(f"the {run.key} run did not go idle within {DEADLINE_S:.0f}s") from None
    finally:
        stop.set()
        await sampler
    if code != 0:
        raise RuntimeError(f"the {run.key} run ended with exit code {code}")
    summary = json.loads(await asyncio.to_thread(report.read_text))
    burst = [r for r in responses.answered if r.phase == "burst"]
    return Outcome(
        scenario=run,
        published=summary["producers"][PRODUCER]["published"],
        processed=summary["consumers"][CONSUMER]["processed"],
        max_consumers=summary["consumers"][CONSUMER]["max_consumers"],
        seconds=summary["elapsed_s"],
        response=[r.seconds for r in responses.answered],
        burst_served=max(r.answered_at for r in burst) - min(r.sent_at for r in burst),
        samples=samples,
        quiet_rate=module.PHASES[-1][2],  # type: ignore[union-attr]
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def table(outcomes: list[Outcome]) -> str:
    head = ("requests", "p50", "p99", "max", "burst served in", "max consumers", "elapsed")
    widths = (8, 10, 10, 10, 15, 13, 8)
    rows = [f"{'consumers':<11}" + "".join(f"{h:>{w + 2}}" for h, w in zip(head, widths, strict=True))]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        values = (
            str(o.processed), _ms(o.percentile(0.50)), _ms(o.percentile(0.99)), _ms(max(o.response)),
            f"{o.burst_served:.2f} s", str(o.max_consumers), f"{o.seconds:.2f} s",
        )  # fmt: skip
        rows.append(
            f"{o.scenario.key:<11}" + "".join(f"{v:>{w + 2}}" for v, w in zip(values, widths, strict=True))
        )
    return "\n".join(rows)


def at(samples: list[Sample], t: float) -> Sample | None:
    """The last sample taken at or before `t`; None once the run has ended."""
    if not samples or t > samples[-1].at + SAMPLE_EVERY:
        return None
    earlier = [s for s in samples if s.at <= t]
    return earlier[-1] if earlier else samples[0]


def timeline(fixed: Outcome, auto: Outcome) -> str:
    """Consumers and queue depth over time: every 0.5 s while both run, then every 2 s."""
    rows = [f"{'t':>6}  {'fixed: consumers':>16}  {'depth':>6}    {'autoscale: consumers':>20}  {'depth':>6}"]
    rows.append("-" * len(rows[0]))
    end = max(fixed.samples[-1].at, auto.samples[-1].at)
    t = 0.0
    while t <= end + 1e-9:
        cells = []
        for outcome, width in ((fixed, 16), (auto, 20)):
            s = at(outcome.samples, t)
            cells.append(
                f"{'(done)':>{width}}  {'':>6}" if s is None else f"{s.consumers:>{width}}  {s.depth:>6}"
            )
        rows.append(f"{t:>5.1f}s  {cells[0]}    {cells[1]}".rstrip())
        t += 0.5 if t < auto.samples[-1].at else 2.0
    return "\n".join(rows)


def say(text: str) -> None:
    print(textwrap.fill(text, WIDTH))


async def main() -> int:
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in SCENARIOS:
            print(f"== {run.key}: {run.sizing} …", flush=True)
            outcome = await scenario(run, Path(tmp) / f"report-{run.key}.json")
            outcomes[run.key] = outcome
            print(
                f"   {outcome.processed} of {outcome.published} requests answered in {outcome.seconds:.2f}s"
            )
    fixed, auto = outcomes["fixed"], outcomes["autoscale"]
    policy = load_pipeline(PIPELINE).model.consumers[CONSUMER].autoscale
    assert policy is not None
    settled = auto.samples[-1].consumers or auto.samples[-2].consumers

    print(f"\n{table([fixed, auto])}\n")
    print("response time = answered - sent_at; burst served in = first burst request sent → last answered\n")
    print(timeline(fixed, auto))
    print()
    for when, before, after, depth in auto.changes():
        print(f"  autoscale at {when:4.1f}s: {before:>2} → {after:>2} consumers (queue depth {depth})")
    print()
    say(
        f"One consumer answers the trickle at once, but the burst waits in the queue: half the requests "
        f"waited {_ms(fixed.percentile(0.5))} or more and the slowest {_ms(max(fixed.response))}. With "
        f"autoscale the supervisor saw the queue deepen and went to {auto.max_consumers} consumers "
        f"at once: p50 {_ms(auto.percentile(0.5))}, p99 {_ms(auto.percentile(0.99))}, the burst served "
        f"in {auto.burst_served:.1f} s instead of {fixed.burst_served:.1f} s."
    )
    downs = [change for change in auto.changes() if change[2] < change[1]]
    if downs:
        when, before, after, _ = downs[0]
        say(
            f"Scaling down waits: once the queue was empty the target fell to {policy.min}, and after it had "
            f"stayed below the count for keep_alive ({policy.keep_alive:g} s) the supervisor retired the "
            f"consumers idle at that moment: {before} → {after} at {when:.1f} s, while the quiet tail "
            f"({auto.quiet_rate:g} requests/s) went on with {settled} consumer(s) at the end of the run."
        )
    held = fixed.processed == auto.processed == fixed.published == auto.published
    held = held and auto.max_consumers > 1 and auto.percentile(0.99) < fixed.percentile(0.99)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
