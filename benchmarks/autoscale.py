"""Supervisor consumer (pattern 5): response time through a 10x load spike, fixed consumers vs autoscale.

A `module:function` source (an async generator taking `ctx`) paces itself through phases, 2 s at
50/s, 2 s at 500/s, 3 s at 50/s, then 2 s without events (so the scale-down shows), stamping
`sent_at` (time.time()) on each event as it yields it. The consumer's handler is I/O-bound
(`await asyncio.sleep(0.02)`): one consumer handles about 50/s, the spike needs 10. The response
time of an event is its handler's start - `sent_at`: the time it waited in the queue.

Rows, interleaved run by run; medians of `--repeat`:

  - `concurrency: 1` and `concurrency: 4` (fixed);
  - `autoscale: depth/10 max 32 min 1 every 250ms keep_alive 1s`.

Columns: p50/p99 over all events and over the events sent during the spike; "drain s", how long
after the spike ended the last event sent during it started (0 when the consumer kept up); the
largest depth (ready messages) the runner saw; the most consumers. The runner runs in-process on
the memory broker (`Runner(loaded, RunOptions(until_idle=True))`); a side task samples the consumer
count (`runner.stats.consumers[name].consumers`) and the depth every 100 ms, shown for the last run.

    python benchmarks/autoscale.py [--repeat 2] [--handler-ms 20] [--autoscale "depth/10 max 32 …"]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from runner.config.loader import load_pipeline
from runner.runtime import loop as event_loop
from runner.runtime.app import Runner, RunOptions

PLUGIN_MODULE = "autoscale_bench"
PLUGIN = '''\
"""Written by benchmarks/autoscale.py: a phased source stamping sent_at, and a 20 ms handler."""

import asyncio
import time

PHASES = []  # (name, seconds, events per second); 0/s is a pause
HANDLER_S = 0.02
records = []  # (phase, sent_at, handler start), in arrival order
timeline = {}  # phase -> (start, end), wall clock, from the source's schedule


def reset(phases, handler_s):
    global PHASES, HANDLER_S
    PHASES, HANDLER_S = phases, handler_s
    records.clear()
    timeline.clear()


async def source(ctx):
    loop = asyncio.get_running_loop()
    origin, origin_wall = loop.time(), time.time()
    at, n = 0.0, 0  # at: when the next event is due, in seconds from the origin
    for phase, seconds, rate in PHASES:
        timeline[phase] = (origin_wall + at, origin_wall + at + seconds)
        end = at + seconds
        if not rate:
            await asyncio.sleep(max(0.0, origin + end - loop.time()))
            at = end
            continue
        while at < end - 1e-9:
            delay = origin + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield {"n": n, "phase": phase, "sent_at": time.time()}
            n += 1
            at += 1.0 / rate


async def handle(event, ctx):
    records.append((event["phase"], event["sent_at"], time.time()))
    await asyncio.sleep(HANDLER_S)
'''

PIPELINE = """\
version: 1
name: autoscale-bench
plugins: [.]
telemetry: {{traces: none}}
producers:
  load: {{source: "autoscale_bench:source", to: work}}
consumers:
  worker:
    from: work
    handler: autoscale_bench:handle
    {sizing}
"""
QUEUE, CONSUMER = "work", "worker"
SPIKE = "spike"
SAMPLE_S = 0.1

console = Console()
if not console.is_terminal:  # a log or a pipe: the table keeps its columns
    console = Console(width=140)


@dataclass
class Result:
    p50: float  # ms
    p99: float
    spike_p50: float
    spike_p99: float
    drain: float  # s after the spike's end until the last event sent during it started
    max_depth: int
    max_consumers: int
    elapsed: float
    # (seconds since the source started, consumers, depth), every SAMPLE_S
    samples: list[tuple[float, int, int]] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _run_sampled(runner: Runner) -> tuple[int, list[tuple[float, int, int]]]:
    """Run the pipeline; meanwhile sample the consumer count and the depth every SAMPLE_S."""
    samples: list[tuple[float, int, int]] = []
    task = asyncio.create_task(runner.run())
    while not task.done():
        stats = runner.stats.consumers.get(CONSUMER)
        if stats is not None:
            samples.append((time.time(), stats.consumers, runner.stats.depth.get(QUEUE, 0)))
        await asyncio.wait({task}, timeout=SAMPLE_S)
    return task.result(), samples


def run_once(
    folder: Path,
    plugin: ModuleType | None,
    *,
    sizing: str,
    phases: list[tuple[str, float, float]],
    handler_s: float,
    label: str,
) -> tuple[Result, ModuleType]:
    (folder / "bench.yaml").write_text(PIPELINE.format(sizing=sizing))
    loaded = load_pipeline(folder / "bench.yaml")
    if plugin is None:
        plugin = sys.modules[loaded.resolve(f"{PLUGIN_MODULE}:handle").__module__]
    plugin.reset(phases, handler_s)
    expected = sum(round(seconds * rate) for _, seconds, rate in phases)
    runner = Runner(loaded, RunOptions(until_idle=True))
    start = time.perf_counter()
    code, raw = event_loop.run(_run_sampled(runner))
    elapsed = time.perf_counter() - start
    stats = runner.stats.consumers[CONSUMER]
    records = list(plugin.records)
    if code != 0 or stats.processed != expected or len(records) != expected:
        sys.exit(f"{label}: exit {code}, processed {stats.processed} ({len(records)} recorded) of {expected}")
    waits = [1000 * (started - sent) for _, sent, started in records]
    spike = [1000 * (started - sent) for phase, sent, started in records if phase == SPIKE]
    spike_end = plugin.timeline[SPIKE][1]
    last_spike_start = max(started for phase, _, started in records if phase == SPIKE)
    origin = plugin.timeline[phases[0][0]][0]
    return Result(
        p50=percentile(waits, 50),
        p99=percentile(waits, 99),
        spike_p50=percentile(spike, 50),
        spike_p99=percentile(spike, 99),
        drain=max(0.0, last_spike_start - spike_end),
        max_depth=runner.stats.max_depth.get(QUEUE, 0),
        max_consumers=stats.max_consumers,
        elapsed=elapsed,
        samples=[(at - origin, consumers, depth) for at, consumers, depth in raw],
    ), plugin


@dataclass
class Row:
    label: str
    short: str
    sizing: str
    results: list[Result] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the median is shown")
    parser.add_argument("--handler-ms", type=float, default=20.0, help="the handler's asyncio.sleep")
    parser.add_argument("--base", type=float, default=50.0, help="events/s before and after the spike")
    parser.add_argument("--spike", type=float, default=10.0, help="the spike's rate, times --base")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds without events at the end")
    parser.add_argument("--autoscale", default="depth/10 max 32 min 1 every 250ms keep_alive 1s")
    args = parser.parse_args()
    phases = [
        ("before", 2.0, args.base),
        (SPIKE, 2.0, args.base * args.spike),
        ("after", 3.0, args.base),
        *([("quiet", args.tail, 0.0)] if args.tail > 0 else []),
    ]
    rows = [
        Row("concurrency: 1", "concurrency 1", "concurrency: 1"),
        Row("concurrency: 4", "concurrency 4", "concurrency: 4"),
        Row(f"autoscale: {args.autoscale}", "autoscale", f'autoscale: "{args.autoscale}"'),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
        plugin: ModuleType | None = None
        for repeat in range(args.repeat):
            for row in rows:
                label = f"{row.label}, run {repeat + 1}"
                result, plugin = run_once(
                    folder,
                    plugin,
                    sizing=row.sizing,
                    phases=phases,
                    handler_s=args.handler_ms / 1000,
                    label=label,
                )
                row.results.append(result)
                console.print(
                    f"[dim]{label}: p50 {result.p50:,.0f} ms, p99 {result.p99:,.0f} ms, "
                    f"drain {result.drain:.1f} s, max {result.max_consumers} consumers[/dim]"
                )
    print_tables(rows, phases, args)


def print_tables(rows: list[Row], phases: list[tuple[str, float, float]], args: argparse.Namespace) -> None:
    shape = ", ".join(f"{seconds:g} s at {rate:g}/s" for _, seconds, rate in phases if rate)
    table = Table(
        title=f"response time through a {args.spike:g}x spike ({shape}), "
        f"{args.handler_ms:g} ms handlers, memory broker, median of {args.repeat}"
    )
    table.add_column("consumer")
    for name in ("p50 ms", "p99 ms", "spike p50 ms", "spike p99 ms", "drain s", "max depth"):
        table.add_column(name, justify="right")
    table.add_column("max\nconsumers", justify="right")
    table.add_column("wall s", justify="right")
    for row in rows:
        results = row.results

        def median(attribute: str, results: list[Result] = results) -> float:
            return statistics.median(getattr(r, attribute) for r in results)

        table.add_row(
            row.label,
            f"{median('p50'):,.0f}",
            f"{median('p99'):,.0f}",
            f"{median('spike_p50'):,.0f}",
            f"{median('spike_p99'):,.0f}",
            f"{median('drain'):.1f}",
            f"{median('max_depth'):,.0f}",
            f"{median('max_consumers'):.0f}",
            f"{median('elapsed'):.1f}",
        )
    console.print(table)
    needed = math.ceil(args.base * args.spike * args.handler_ms / 1000)
    console.print(
        f"the spike needs {needed} consumers of {args.handler_ms:g} ms; response time = handler start - "
        "sent_at; drain s = when the last event sent during the spike started, after the spike ended"
    )
    print_timeline(rows, phases)


def print_timeline(rows: list[Row], phases: list[tuple[str, float, float]], bucket: float = 0.5) -> None:
    """Depth of each row and the autoscaled consumer count over time, from each row's last run.

    Up to the end of the autoscaled run; a row whose queue took longer to empty says when it did.
    """
    last = [row.results[-1] for row in rows]
    end = max(s[0] for s in last[-1].samples)
    table = Table(title=f"over time (last run; largest value in each {bucket:g} s)")
    table.add_column("t s", justify="right")
    table.add_column("phase")
    for row in rows:
        table.add_column(f"depth\n{row.short}", justify="right")
    table.add_column("autoscale\nconsumers", justify="right")
    bounds, at = [], 0.0
    for name, seconds, _ in phases:
        bounds.append((at, at + seconds, name))
        at += seconds
    for index in range(math.ceil(end / bucket)):
        lo, hi = index * bucket, (index + 1) * bucket

        def within(result: Result, lo: float = lo, hi: float = hi) -> list[tuple[float, int, int]]:
            return [s for s in result.samples if lo <= s[0] < hi]

        phase = next((name for start, stop, name in bounds if start <= lo < stop), "drain")
        depths = [max((d for _, _, d in within(r)), default=None) for r in last]
        consumers = max((c for _, c, _ in within(last[-1])), default=None)
        table.add_row(
            f"{lo:.1f}",
            phase,
            *("" if d is None else f"{d:,}" for d in depths),
            "" if consumers is None else str(consumers),
        )
    console.print(table)
    for row, result in zip(rows, last, strict=True):
        busy = [at for at, _, depth in result.samples if depth > 0]
        if busy and busy[-1] >= end:
            console.print(f"{row.short}: the queue emptied only at t = {busy[-1] + SAMPLE_S:.1f} s")
    line = sparkline([c for _, c, _ in last[-1].samples])
    console.print(f"autoscale consumers every {SAMPLE_S * 1000:.0f} ms: {line}")


def sparkline(values: list[int]) -> str:
    blocks = "▁▂▃▄▅▆▇█"
    top = max(values, default=0) or 1
    line = "".join(blocks[min(len(blocks) - 1, round(v / top * (len(blocks) - 1)))] for v in values)
    return f"{line} (max {top})"


if __name__ == "__main__":
    main()
