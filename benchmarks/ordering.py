"""Thread delegate (pattern 2): N workers with `ordering: by_context(account)` against one consumer.

Every event carries an `account` (one of 100 contexts) and `seq`, its position among that account's
events in publish order. The handler is I/O-bound (`await asyncio.sleep(0.005)`) and records
(context, seq, worker, start, end) in arrival order, so each run is checked, not just timed:

  - order violations, by start (arrival) and by finish: events that started (finished) after an
    event published later in the same context had (publish order is seq order: the file source
    publishes the file's lines in order);
  - context on 2 workers at once: events that started while an earlier event of the same context
    was still running (on any worker): "one at a time" broken;
  - every event handled exactly once (at least once on RabbitMQ; duplicates are reported).

Without ordering on the memory broker, each free worker takes the next message of the one FIFO,
so starts stay nearly in publish order (a few swap when the broker yields to the loop between
taking a message and handing it over) and, with a constant handler time, so do finishes: what
breaks most is "one at a time". With `--jitter-ms` (handler time 5 ms ± jitter) that turns into
finishes out of order; on RabbitMQ each worker's prefetch buffer reorders the starts too.

Rows, interleaved run by run so a noisy neighbour slows every row alike; medians of `--repeat`:

  1. one consumer (`concurrency: 1`, no ordering policy): in order because it is alone (baseline);
  2. 8 workers with `ordering: by_context(account)`, contexts uniform;
  3. 8 workers without ordering (reference: fast, but out of order);
  4. and 5. the same two with 3 hot contexts carrying 80% of the events.

Elapsed is first handler start → last handler end, from the records. One consumer takes the same
time however the events spread over contexts, so both distributions are compared with row 1.
"ideal" is the least time the work allows: max(the hottest context's events, events / workers) x
the mean handler time; a context is processed one event at a time, so with skew the hottest context
is the floor, whatever the number of workers.

    python benchmarks/ordering.py [--events 4000] [--contexts 100] [--workers 8] [--repeat 2]
                                  [--jitter-ms 0]
    python benchmarks/ordering.py --broker amqp://guest:guest@127.0.0.1:5672/

On RabbitMQ every run uses fresh queue names and deletes its queues afterwards. Delivery there is
at least once: events handled again after a lost connection are counted as duplicates (and the
order checks look at first arrivals); the "redelivered" count shows whether a run lost one.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from runner.config.loader import load_pipeline
from runner.runtime import loop as event_loop
from runner.runtime.app import Runner, RunOptions

PLUGIN_MODULE = "ordering_bench"
PLUGIN = '''\
"""Written by benchmarks/ordering.py: an I/O-bound handler that records what it ran, and when."""

import asyncio
import random
import time

DELAY, JITTER = 0.005, 0.0
records = []  # [context, seq, worker, start, end, redelivered], in arrival order
finished = []  # (context, seq), in completion order


def reset(delay, jitter):
    global DELAY, JITTER
    DELAY, JITTER = delay, jitter
    records.clear()
    finished.clear()


async def handle(event, ctx):
    row = [event["account"], event["seq"], ctx.worker, time.perf_counter(), 0.0, ctx.redelivered]
    records.append(row)
    await asyncio.sleep(DELAY + random.uniform(-JITTER, JITTER) if JITTER else DELAY)
    row[4] = time.perf_counter()
    finished.append((row[0], row[1]))
'''

PIPELINE = """\
version: 1
name: ordering-bench
broker: memory
plugins: [.]
telemetry: {{traces: none}}
producers:
  feed: {{source: file({events}), to: {queue}}}
consumers:
  {consumer}:
    from: {queue}
    handler: ordering_bench:handle
    concurrency: {workers}
{ordering}"""

HOT = 3
HOT_SHARE = 0.8

console = Console()
if not console.is_terminal:  # a log or a pipe: the table keeps its columns
    console = Console(width=140)


# -- events ---------------------------------------------------------------------------------------


def write_events(path: Path, count: int, contexts: int, skewed: bool, seed: int) -> Counter[str]:
    """`count` events over `contexts` accounts, each with its per-account `seq`; the counts per account."""
    rng = random.Random(seed)
    names = [f"A-{i:03d}" for i in range(contexts)]
    if skewed:  # exactly HOT_SHARE of the events on the hot contexts, evenly; the rest at random
        hot = round(HOT_SHARE * count)
        accounts = [names[i % HOT] for i in range(hot)]
        accounts += [rng.choice(names[HOT:]) for _ in range(count - hot)]
        rng.shuffle(accounts)
    else:
        accounts = [rng.choice(names) for _ in range(count)]
    seqs: Counter[str] = Counter()
    with path.open("wb") as out:
        for n, account in enumerate(accounts):
            out.write(orjson.dumps({"n": n, "account": account, "seq": seqs[account]}) + b"\n")
            seqs[account] += 1
    return seqs


# -- checks ----------------------------------------------------------------------------------------


def order_violations(arrivals: list[tuple[str, int]]) -> int:
    """Events that came after an event published later in the same context.

    Only first arrivals count: an event handled again (a redelivery after a lost connection, allowed
    by at-least-once) repeats what already happened in order, and is counted as a duplicate.
    """
    highest: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    bad = 0
    for context, seq in arrivals:
        if (context, seq) in seen:
            continue
        seen.add((context, seq))
        if seq < highest.get(context, -1):
            bad += 1
        else:
            highest[context] = seq
    return bad


def concurrent_contexts(records: list[list[Any]]) -> int:
    """Events that started while an earlier event of the same context was still running."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for context, _seq, _worker, start, end, _redelivered in records:
        spans[context].append((start, end))
    overlaps = 0
    for context_spans in spans.values():
        context_spans.sort()
        running_until = -math.inf
        for start, end in context_spans:
            if start < running_until:
                overlaps += 1
            running_until = max(running_until, end)
    return overlaps


@dataclass
class Result:
    rate: float  # events/s, first handler start → last handler end
    elapsed: float
    handler_s: float  # mean time in the handler (the 5 ms sleep as the loop delivers it)
    started_out_of_order: int
    finished_out_of_order: int
    overlaps: int
    duplicates: int  # events handled more than once (at-least-once on RabbitMQ)
    redelivered: int  # handler calls with ctx.redelivered


def summarise(
    records: list[list[Any]], finished: list[tuple[str, int]], expected: Counter[str], label: str
) -> Result:
    seen = Counter((context, seq) for context, seq, *_ in records)
    missing = [(c, s) for c, n in expected.items() for s in range(n) if (c, s) not in seen]
    if missing or any(r[4] == 0.0 for r in records):
        sys.exit(f"{label}: {len(missing)} events never handled (e.g. {missing[:3]}) or unfinished")
    start = min(r[3] for r in records)
    end = max(r[4] for r in records)
    elapsed = end - start
    return Result(
        rate=len(seen) / elapsed,
        elapsed=elapsed,
        handler_s=statistics.fmean(r[4] - r[3] for r in records),
        started_out_of_order=order_violations([(r[0], r[1]) for r in records]),
        finished_out_of_order=order_violations(finished),
        overlaps=concurrent_contexts(records),
        duplicates=sum(n - 1 for n in seen.values()),
        redelivered=sum(1 for r in records if r[5]),
    )


# -- one run --------------------------------------------------------------------------------------


async def _delete_queues(url: str, queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


def run_once(
    folder: Path,
    plugin: ModuleType | None,
    *,
    events: str,
    expected: Counter[str],
    workers: int,
    ordered: bool,
    delay: float,
    jitter: float,
    broker: str | None,
    label: str,
) -> tuple[Result, ModuleType]:
    tag = uuid.uuid4().hex[:8] if broker else "run"
    queue, consumer = f"ordering-bench-{tag}", f"orders-{tag}"
    ordering = "    ordering: by_context(account)\n" if ordered else ""
    (folder / "bench.yaml").write_text(
        PIPELINE.format(events=events, queue=queue, consumer=consumer, workers=workers, ordering=ordering)
    )
    loaded = load_pipeline(folder / "bench.yaml")
    if plugin is None:
        plugin = sys.modules[loaded.resolve(f"{PLUGIN_MODULE}:handle").__module__]
    plugin.reset(delay, jitter)
    runner = Runner(loaded, RunOptions(broker=broker, until_idle=True))
    try:
        code = event_loop.run(runner.run())
    finally:
        if broker:
            try:
                event_loop.run(_delete_queues(broker, [queue, f"{consumer}.dashboard"]))
            except Exception as exc:  # a broker that went away: say so, keep the results
                console.print(f"[yellow]could not delete {queue}: {exc!r}[/yellow]")
    processed = runner.stats.consumers[consumer].processed
    total = sum(expected.values())
    if code != 0 or processed < total:
        sys.exit(f"{label}: exit {code}, processed {processed} of {total}")
    return summarise(list(plugin.records), list(plugin.finished), expected, label), plugin


# -- main -----------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    dataset: str
    workers: int
    ordered: bool
    results: list[Result]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--contexts", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="the handler's asyncio.sleep")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform jitter on that sleep")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the median is shown")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--broker", default=None, help="amqp://… to run on RabbitMQ (default: memory)")
    args = parser.parse_args()
    if args.contexts <= HOT:
        parser.error(f"--contexts must be above {HOT} (the hot ones)")
    if not 0 <= args.jitter_ms <= args.delay_ms:
        parser.error("--jitter-ms must be between 0 and --delay-ms")
    n = args.workers
    rows = [
        Row("1 consumer", "uniform", 1, False, []),
        Row(f"{n} workers, by_context", "uniform", n, True, []),
        Row(f"{n} workers, no ordering", "uniform", n, False, []),
        Row(f"{n} workers, by_context", "skewed", n, True, []),
        Row(f"{n} workers, no ordering", "skewed", n, False, []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN)
        expected = {
            "uniform": write_events(folder / "uniform.jsonl", args.events, args.contexts, False, args.seed),
            "skewed": write_events(folder / "skewed.jsonl", args.events, args.contexts, True, args.seed),
        }
        plugin: ModuleType | None = None
        for repeat in range(args.repeat):
            for row in rows:
                label = f"{row.label}, {row.dataset}, run {repeat + 1}"
                result, plugin = run_once(
                    folder,
                    plugin,
                    events=f"{row.dataset}.jsonl",
                    expected=expected[row.dataset],
                    workers=row.workers,
                    ordered=row.ordered,
                    delay=args.delay_ms / 1000,
                    jitter=args.jitter_ms / 1000,
                    broker=args.broker,
                    label=label,
                )
                row.results.append(result)
                console.print(
                    f"[dim]{label}: {result.rate:,.0f} events/s, out of order "
                    f"{result.started_out_of_order}/{result.finished_out_of_order}, "
                    f"{result.overlaps} overlaps[/dim]"
                )
    print_table(rows, expected, args)


def print_table(rows: list[Row], expected: dict[str, Counter[str]], args: argparse.Namespace) -> None:
    where = "RabbitMQ" if args.broker else "memory"
    jitter = f" ± {args.jitter_ms:g}" if args.jitter_ms else ""
    baseline = statistics.median(r.elapsed for r in rows[0].results)
    table = Table(
        title=(
            f"thread delegate on {where}: {args.events:,} events over {args.contexts} contexts, "
            f"{args.delay_ms:g}{jitter} ms async handlers, median of {args.repeat}"
        )
    )
    table.add_column("run")
    table.add_column("contexts")
    for name in ("events/s", "x 1 consumer", "elapsed s", "ideal s", "% of ideal"):
        table.add_column(name, justify="right")
    table.add_column("out of order\nstart / finish", justify="right")
    table.add_column("context on 2\nworkers at once", justify="right")
    if args.broker:
        table.add_column("duplicates /\nredelivered", justify="right")
    for row in rows:
        counts = expected[row.dataset]
        handler_s = statistics.median(r.handler_s for r in row.results)
        if row.workers == 1:
            ideal = float(args.events)
        elif row.ordered:
            ideal = max(max(counts.values()), args.events / row.workers)
        else:
            ideal = args.events / row.workers
        ideal_s = ideal * handler_s
        elapsed = statistics.median(r.elapsed for r in row.results)
        share = sum(sorted(counts.values())[-HOT:]) / args.events
        # Worst run, not the median, for the checks: one violation in any run is one too many.
        cells = [
            row.label,
            "uniform" if row.dataset == "uniform" else f"{HOT} hot = {share:.0%}",
            f"{statistics.median(r.rate for r in row.results):,.0f}",
            f"{baseline / elapsed:.1f}x",
            f"{elapsed:.2f}",
            f"{ideal_s:.2f}",
            f"{100 * ideal_s / elapsed:.0f}%",
            f"{max(r.started_out_of_order for r in row.results)} / "
            f"{max(r.finished_out_of_order for r in row.results)}",
            str(max(r.overlaps for r in row.results)),
        ]
        if args.broker:
            duplicates = max(r.duplicates for r in row.results)
            cells.append(f"{duplicates} / {max(r.redelivered for r in row.results)}")
        table.add_row(*cells)
    console.print(table)
    handler_ms = 1000 * statistics.median(r.handler_s for row in rows for r in row.results)
    for dataset, counts in expected.items():
        hottest = max(counts.values())
        console.print(
            f"{dataset}: the hottest context has {hottest} events → at least "
            f"{hottest * handler_ms / 1000:.2f} s with ordering, so at most "
            f"{min(args.events / hottest, args.workers):.1f}x one consumer with {args.workers} workers"
        )
    console.print(
        f"mean handler time {handler_ms:.2f} ms; ideal = max(hottest context, events / workers) x it "
        "with ordering, events / workers without; the checks show the worst run."
    )


if __name__ == "__main__":
    main()
