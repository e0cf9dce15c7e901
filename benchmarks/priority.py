"""Ambulance / carpool (pattern 3): how long priority events wait behind a backlog, and what an idle
lane costs the standard traffic.

Part 1, wait under a backlog. A `backlog` producer publishes `--backlog` standard events (kind
"S"); an `urgent` producer then publishes `--priority` priority events (kind "P") spread over the
drain: priority event k goes out once k x 0.9 x backlog / priority standard events have started, so
the first one arrives behind the whole backlog and the last one behind a tenth of it. Every event
carries `sent_at` (time.time()), stamped when its source yields it, just before it is published.
On the memory broker both producers run with the consumer (the backlog is queued in a few tens of
ms, far faster than it drains; `urgent` waits until it is); on RabbitMQ, whose publisher confirms
are slower than the consumer, a first run of the `backlog` producer alone fills the queue, then
`urgent` and the consumer run (so there, standard waits include that first run's tail and the
second run's start-up). One consumer with `--workers` workers runs an I/O-bound handler
(`await asyncio.sleep(--work-ms)`); an event's wait is its handler's start - `sent_at`. Setups:

  - no lane: everything on one queue; the priority events are standard events there;
  - ambulance: `priority_lane: when(kind == 'P')`: every worker reads the lane before its queue;
  - carpool: `priority_lane: {when: "kind == 'P'", mode: carpool, carpool: 1}`: one more worker
    that reads only the lane (the --workers workers still serve the queue).

Columns: p50/p99 wait of the priority and of the standard events (all runs pooled); "S ahead",
the median number of standard events that started between a priority event's publish and its
start (how much of the backlog it still waited for); "P on lane", priority events whose handler
saw `ctx.lane == "priority"`; "drain s", the first standard start to the last standard end; the
mean time in the handler (the sleep as the loop delivers it). A setup is flagged in red when an
event was handled twice, a standard event reached the lane or a carpool worker took a standard one.

Part 2, standard throughput with an idle lane. `--events` standard events (`--amqp-events` on
RabbitMQ) from a generator source to a consumer with `--tp-workers` workers and a trivial async
handler: without `priority_lane`; with `priority_lane: when(kind == 'P')`, which never holds (the
lane stays empty, but the publisher evaluates the expression for every event and every worker
looks at the lane before its queue); and, to tell those two costs apart, with `priority_lane:
true` (a lane for marked events only: no expression). events/s = events / (first event taken from
the source → last handler call); CPU µs/event = this process's CPU time over the same span (the
producer, the consumer and the AMQP client all run here; RabbitMQ's own CPU is not in it), steadier
than events/s on a shared machine. Medians of `--repeat` runs; the setups alternate which goes
first (forward, then backward). The target: an idle `when(...)` lane within 5% of no lane.

Everything runs in this process (`Runner(loaded, RunOptions(broker=…, until_idle=True))`) on the
memory broker and/or RabbitMQ; on RabbitMQ every run uses fresh queue names, deleted before and
after (the queue, its `.priority` lane and the consumer's dashboard queue).

    python benchmarks/priority.py [--broker memory|amqp|both] [--url amqp://…]
                                  [--backlog 10000] [--priority 50] [--work-ms 1] [--workers 4]
                                  [--wait-repeat 1] [--events 50000] [--amqp-events 20000]
                                  [--tp-workers 4] [--repeat 3] [--only wait|throughput]
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from runner.config.loader import load_pipeline
from runner.runtime import loop as event_loop
from runner.runtime.app import Runner, RunOptions

PLUGIN_MODULE = "priority_bench"
PLUGIN = '''\
"""Written by benchmarks/priority.py: a backlog-then-priority source and a timed handler (part 1),
a plain source and a counting handler (part 2)."""

import asyncio
import time

BACKLOG, PRIORITY, SPREAD, WORK = 10_000, 50, 0.9, 0.001
EVENTS = 0
records = []  # (kind, sent_at, start, end, ctx.lane, ctx.worker), in completion order
started = {"S": 0, "P": 0}
backlog_done = [False]
stream_started = [0.0, 0.0]  # perf_counter and process_time when the source gave its first event
calls = [0, 0.0, 0.0]  # handler calls, perf_counter of the last one, process_time at the EVENTS-th
per_worker = {}


def reset(backlog=0, priority=0, spread=0.9, work=0.0, events=0):
    global BACKLOG, PRIORITY, SPREAD, WORK, EVENTS
    BACKLOG, PRIORITY, SPREAD, WORK, EVENTS = backlog, priority, spread, work, events
    records.clear()
    started.update(S=0, P=0)
    backlog_done[0] = False
    stream_started[:] = [0.0, 0.0]
    calls[:] = [0, 0.0, 0.0]
    per_worker.clear()


def backlog():
    for i in range(BACKLOG):
        yield {"id": i, "kind": "S", "sent_at": time.time()}
    backlog_done[0] = True  # resumed after the last yield: with a window of 1 (memory), it is published


async def urgent():
    while not backlog_done[0]:
        await asyncio.sleep(0.002)
    step = SPREAD * BACKLOG / PRIORITY if PRIORITY else 0
    for k in range(PRIORITY):
        while started["S"] < k * step:
            await asyncio.sleep(0.002)
        yield {"id": BACKLOG + k, "kind": "P", "sent_at": time.time()}


async def timed(event, ctx):
    start = time.time()
    kind = event["kind"]
    started[kind] += 1
    await asyncio.sleep(WORK)
    records.append((kind, event["sent_at"], start, time.time(), ctx.lane, ctx.worker))


def stream():
    stream_started[:] = [time.perf_counter(), time.process_time()]
    for i in range(EVENTS):
        yield {"id": i, "kind": "S", "account": f"A-{i % 97}", "symbol": "AAPL", "shares": 100 + i % 900}


async def count(event, ctx):
    calls[0] += 1
    calls[1] = time.perf_counter()
    if calls[0] == EVENTS:
        calls[2] = time.process_time()
    per_worker[ctx.worker] = per_worker.get(ctx.worker, 0) + 1
'''

PIPELINE = """\
version: 1
name: priority-bench
broker: memory
plugins: [.]
telemetry: {{traces: none}}
producers:
{producers}consumers:
  {consumer}:
    from: {queue}
    handler: priority_bench:{handler}
    concurrency: {workers}
{lane}"""

WAIT_PRODUCERS = """\
  backlog: {{source: "priority_bench:backlog", to: {queue}}}
  urgent: {{source: "priority_bench:urgent", to: {queue}}}
"""
THROUGHPUT_PRODUCERS = """\
  feed: {{source: "priority_bench:stream", to: {queue}}}
"""
WHEN = "kind == 'P'"
SETUPS = {
    "no lane": "",
    "ambulance": f'    priority_lane: "when({WHEN})"\n',
    "carpool": f'    priority_lane: {{when: "{WHEN}", mode: carpool, carpool: 1}}\n',
}
NO_LANE = "no lane"
THROUGHPUT_SETUPS = {
    NO_LANE: SETUPS["no lane"],
    f"idle lane: when({WHEN})": SETUPS["ambulance"],
    "idle lane: true": "    priority_lane: true\n",
}
TARGET = 0.05  # an idle lane within 5% of no lane

console = Console()
if not console.is_terminal:  # a log or a pipe: the table keeps its columns
    console = Console(width=160)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- one run ----------------------------------------------------------------------------------------


async def _delete_queues(url: str, queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


def delete_queues(url: str, queues: list[str]) -> None:
    """Delete a run's queues; a broker that went away is reported, not raised over the result."""
    try:
        event_loop.run(_delete_queues(url, queues))
    except Exception as exc:
        console.print(f"[yellow]could not delete {queues}: {exc!r}[/yellow]")


class Bench:
    """The temporary folder with the plugin, and the plugin module once the loader imported it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
        self.plugin: ModuleType | None = None

    def run(
        self,
        *,
        url: str | None,
        producers: str,
        handler: str,
        workers: int,
        lane: str,
        queue_first: bool = False,
        **reset: float,
    ) -> tuple[Runner, str]:
        """Run the pipeline to idle with the plugin reset to `reset`; the runner (for its stats) and
        the consumer's name. `queue_first`: a first run of the `backlog` producer alone fills the
        queue, then the other services run."""
        tag = uuid.uuid4().hex[:8] if url else "run"
        queue, consumer = f"priority-bench-{tag}", f"lanes-{tag}"
        (self.folder / "bench.yaml").write_text(
            PIPELINE.format(
                producers=producers.format(queue=queue),
                queue=queue,
                consumer=consumer,
                handler=handler,
                workers=workers,
                lane=lane,
            )
        )
        loaded = load_pipeline(self.folder / "bench.yaml")
        if self.plugin is None:
            self.plugin = sys.modules[loaded.resolve(f"{PLUGIN_MODULE}:{handler}").__module__]
        self.plugin.reset(**reset)
        queues = [queue, f"{queue}.priority", f"{consumer}.dashboard"]
        if url:
            delete_queues(url, queues)
        phases: list[list[str]] = [[]]  # [] = every service
        if queue_first:
            phases = [["backlog"], [n for n in (*loaded.model.producers, consumer) if n != "backlog"]]
        try:
            for only in phases:
                runner = Runner(loaded, RunOptions(broker=url, until_idle=True, only=only))
                code = event_loop.run(runner.run())
                if code != 0:
                    sys.exit(f"{handler} run on {'RabbitMQ' if url else 'memory'}: exit {code}")
        finally:
            if url:
                delete_queues(url, queues)
        return runner, consumer


# -- part 1: wait under a backlog -------------------------------------------------------------------


@dataclass
class WaitRow:
    broker: str
    setup: str
    priority_waits: list[float] = field(default_factory=list)  # ms, every run pooled
    standard_waits: list[float] = field(default_factory=list)
    ahead: list[int] = field(default_factory=list)  # standard events started between P's publish and start
    on_lane: int = 0
    priority_events: int = 0
    drains: list[float] = field(default_factory=list)
    handler_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def wait_run(bench: Bench, row: WaitRow, url: str | None, args: argparse.Namespace) -> None:
    runner, consumer = bench.run(
        url=url,
        producers=WAIT_PRODUCERS,
        handler="timed",
        workers=args.workers,
        lane=SETUPS[row.setup],
        backlog=args.backlog,
        priority=args.priority,
        spread=0.9,
        work=args.work_ms / 1000,
        queue_first=url is not None,
    )
    assert bench.plugin is not None
    records = list(bench.plugin.records)
    priority = [r for r in records if r[0] == "P"]
    standard = [r for r in records if r[0] == "S"]
    if len(priority) < args.priority or len(standard) < args.backlog:
        sys.exit(f"{row.broker} {row.setup}: handled {len(standard)} S and {len(priority)} P events")
    if len(records) > args.backlog + args.priority:
        row.problems.append(f"{len(records) - args.backlog - args.priority} handled twice")
    row.priority_waits += [1000 * (start - sent) for _, sent, start, *_ in priority]
    row.standard_waits += [1000 * (start - sent) for _, sent, start, *_ in standard]
    starts = sorted(r[2] for r in standard)
    row.ahead += [
        bisect.bisect_left(starts, start) - bisect.bisect_left(starts, sent)
        for _, sent, start, *_ in priority
    ]
    row.on_lane += sum(1 for r in priority if r[4] == "priority")
    row.priority_events += len(priority)
    if row.setup != "no lane" and any(r[4] != "standard" for r in standard):
        row.problems.append("a standard event on the lane")
    if row.setup == "carpool":
        lane_workers = {r[5] for r in priority}
        if lane_workers & {r[5] for r in standard}:
            row.problems.append("a carpool worker took standard events")
    row.drains.append(max(r[3] for r in standard) - min(r[2] for r in standard))
    row.handler_ms.append(1000 * statistics.fmean(r[3] - r[2] for r in records))
    processed = runner.stats.consumers[consumer].processed
    console.print(
        f"[dim]{row.broker}, {row.setup}: {processed:,} events, priority p50 "
        f"{percentile(row.priority_waits, 50):,.1f} ms, drain {row.drains[-1]:.1f} s[/dim]"
    )


def print_wait_table(rows: list[WaitRow], args: argparse.Namespace) -> None:
    runs = f", {args.wait_repeat} runs pooled" if args.wait_repeat > 1 else ""
    table = Table(
        title=f"part 1: wait (handler start - sent_at) with a backlog of {args.backlog:,} standard events, "
        f"{args.priority} priority events spread over its drain, {args.workers} workers, "
        f"{args.work_ms:g} ms handlers{runs}",
        caption="S ahead = standard events that started between a priority event's publish and its start "
        "(median); drain = first standard start → last standard end",
    )
    table.add_column("broker")
    table.add_column("setup")
    table.add_column("workers", justify="right")
    for name in ("priority\np50 ms", "priority\np99 ms", "standard\np50 ms", "standard\np99 ms"):
        table.add_column(name, justify="right")
    for name in ("S ahead\np50", "P on\nlane", "drain s", "handler\nms"):
        table.add_column(name, justify="right")
    for row in rows:
        workers = f"{args.workers} + 1 carpool" if row.setup == "carpool" else str(args.workers)
        table.add_row(
            row.broker,
            row.setup + "".join(f" [red]({p})[/red]" for p in row.problems),
            workers,
            f"{percentile(row.priority_waits, 50):,.1f}",
            f"{percentile(row.priority_waits, 99):,.1f}",
            f"{percentile(row.standard_waits, 50):,.0f}",
            f"{percentile(row.standard_waits, 99):,.0f}",
            f"{statistics.median(row.ahead):,.0f}",
            f"{row.on_lane}/{row.priority_events}",
            f"{statistics.median(row.drains):.2f}",
            f"{statistics.median(row.handler_ms):.2f}",
        )
    console.print(table)


# -- part 2: standard throughput, idle lane vs none ------------------------------------------------


@dataclass
class ThroughputRow:
    broker: str
    setup: str
    events: int
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # this process's CPU per event (client side)
    walls: list[float] = field(default_factory=list)
    spread: list[tuple[int, int]] = field(default_factory=list)  # (fewest, most) events of one worker


def throughput_run(bench: Bench, row: ThroughputRow, url: str | None, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    runner, consumer = bench.run(
        url=url,
        producers=THROUGHPUT_PRODUCERS,
        handler="count",
        workers=args.tp_workers,
        lane=THROUGHPUT_SETUPS[row.setup],
        events=row.events,
    )
    wall = time.perf_counter() - start
    assert bench.plugin is not None
    calls, last, cpu_end = bench.plugin.calls
    first, cpu_start = bench.plugin.stream_started
    processed = runner.stats.consumers[consumer].processed
    if calls < row.events or processed < row.events:
        sys.exit(f"{row.broker} {row.setup}: {calls} handler calls, {processed} processed of {row.events}")
    rate = row.events / (last - first)
    row.rates.append(rate)
    row.cpu_us.append(1e6 * (cpu_end - cpu_start) / row.events)
    row.walls.append(wall)
    counts = [bench.plugin.per_worker.get(w, 0) for w in range(1, args.tp_workers + 1)]
    row.spread.append((min(counts), max(counts)))
    console.print(
        f"[dim]{row.broker}, {row.setup}: {rate:,.0f} events/s, {row.cpu_us[-1]:.1f} CPU µs/event, "
        f"per worker {counts}[/dim]"
    )


def print_throughput_table(rows: list[ThroughputRow], args: argparse.Namespace) -> None:
    table = Table(
        title=f"part 2: standard throughput, idle lane vs no lane, {args.tp_workers} workers, "
        f"trivial async handler, median of {args.repeat} (alternating order)",
        caption="events/s = events / (first event taken from the source → last handler call); CPU µs/event = "
        "this process's CPU time (producer, consumer and client library; not RabbitMQ's) over the same span, "
        "steadier than events/s on a shared machine; per worker = fewest / most events one worker handled "
        "(median run)",
    )
    table.add_column("broker")
    table.add_column("setup")
    table.add_column("events", justify="right")
    table.add_column("events/s", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("events/s\nvs no lane", justify="right")
    table.add_column("target\n≥ 95%", justify="center")
    table.add_column("CPU\nµs/event", justify="right")
    table.add_column("CPU\nvs no lane", justify="right")
    table.add_column("per worker\nfewest / most", justify="right")
    table.add_column("wall s", justify="right")
    base: dict[str, tuple[float, float]] = {}
    for row in rows:
        rate, cpu = statistics.median(row.rates), statistics.median(row.cpu_us)
        if row.setup == NO_LANE:
            base[row.broker] = rate, cpu
        base_rate, base_cpu = base.get(row.broker, (math.nan, math.nan))
        ratio = rate / base_rate
        verdict = (
            "" if row.setup == NO_LANE else ("[green]yes[/green]" if ratio >= 1 - TARGET else "[red]no[/red]")
        )
        middle = sorted(zip(row.rates, row.spread, strict=True))[len(row.rates) // 2][1]
        table.add_row(
            row.broker,
            row.setup,
            f"{row.events:,}",
            f"{rate:,.0f}",
            " ".join(f"{r / 1000:,.1f}k" for r in row.rates),
            f"{100 * ratio:.1f}%",
            verdict,
            f"{cpu:.1f}",
            f"{100 * cpu / base_cpu:.0f}%",
            f"{middle[0]:,} / {middle[1]:,}",
            f"{statistics.median(row.walls):.2f}",
        )
    console.print(table)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=("memory", "amqp", "both"), default="both")
    parser.add_argument("--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--only", choices=("wait", "throughput"), help="run one part only")
    wait = parser.add_argument_group("part 1: wait under a backlog")
    wait.add_argument("--backlog", type=int, default=10_000, help="standard events queued first")
    wait.add_argument("--priority", type=int, default=50, help="priority events, spread over the drain")
    wait.add_argument("--work-ms", type=float, default=1.0, help="the handler's asyncio.sleep")
    wait.add_argument("--workers", type=int, default=4, help="the consumer's concurrency")
    wait.add_argument("--wait-repeat", type=int, default=1, help="runs per setup, pooled")
    throughput = parser.add_argument_group("part 2: standard throughput, idle lane vs no lane")
    throughput.add_argument("--events", type=int, default=50_000, help="events per run on memory")
    throughput.add_argument("--amqp-events", type=int, default=20_000, help="events per run on RabbitMQ")
    throughput.add_argument("--tp-workers", type=int, default=4, help="the consumer's concurrency")
    throughput.add_argument("--repeat", type=int, default=3, help="runs per setup; the median is shown")
    args = parser.parse_args()
    if args.backlog < 1 or args.priority < 1 or args.workers < 1 or args.tp_workers < 1:
        parser.error("--backlog, --priority, --workers and --tp-workers must be at least 1")
    command = "python benchmarks/priority.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    brokers = {"memory": [None], "amqp": [args.url], "both": [None, args.url]}[args.broker]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(f"{command}\nload average {load} on {os.cpu_count()} cores")
    began = time.perf_counter()
    wait_rows: list[WaitRow] = []
    throughput_rows: list[ThroughputRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        for url in brokers:
            name = "RabbitMQ" if url else "memory"
            if args.only != "throughput":
                rows = [WaitRow(name, setup) for setup in SETUPS]
                for _ in range(args.wait_repeat):
                    for row in rows:
                        wait_run(bench, row, url, args)
                wait_rows += rows
            if args.only != "wait":
                events = args.amqp_events if url else args.events
                rows_tp = [ThroughputRow(name, setup, events) for setup in THROUGHPUT_SETUPS]
                for repeat in range(args.repeat):
                    for row in rows_tp if repeat % 2 == 0 else reversed(rows_tp):
                        throughput_run(bench, row, url, args)
                throughput_rows += rows_tp
    if wait_rows:
        print_wait_table(wait_rows, args)
    if throughput_rows:
        print_throughput_table(throughput_rows, args)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(f"{command}\ntook {time.perf_counter() - began:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
