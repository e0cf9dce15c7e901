"""Events/s on the embedded broker: file source → queue → no-op handler → ack, against the floor.

The floor is an `asyncio.Queue` pass-through of the same events: read the same JSONL file, decode
each line, put it on an asyncio.Queue, take it off in a consumer task and call the same no-op
handler. edarun adds encoding, message ids, acknowledgements, counters and (optionally) tracing.

    python benchmarks/memory_throughput.py [--events 100000] [--repeat 3]

Both the floor and edarun run on the loop edarun uses: uvloop, or asyncio with EDARUN_LOOP=asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from runner.config.loader import load_pipeline
from runner.runtime import loop as event_loop
from runner.runtime.app import Runner, RunOptions

HANDLER = "async def noop(event, ctx):\n    return None\n"
PIPELINE = """\
version: 1
name: bench
plugins: [.]
telemetry: {{traces: {traces}}}
producers:
  feed: {{source: file(events.jsonl), to: events}}
consumers:
  sink: {{from: events, handler: bench_handlers:noop, prefetch: {prefetch}}}
"""


async def noop(event: dict, ctx: object) -> None:
    return None


def write_events(folder: Path, count: int) -> None:
    with (folder / "events.jsonl").open("w") as out:
        for i in range(count):
            event = {
                "id": i,
                "account": f"A-{i % 97}",
                "side": "BUY",
                "symbol": "AAPL",
                "shares": 100 + i % 900,
            }
            out.write(json.dumps(event) + "\n")


async def floor(folder: Path, count: int) -> float:
    queue: asyncio.Queue[dict | None] = asyncio.Queue()
    done = 0

    async def consumer() -> None:
        nonlocal done
        while (event := await queue.get()) is not None:
            await noop(event, None)
            done += 1

    start = time.perf_counter()
    task = asyncio.create_task(consumer())
    with (folder / "events.jsonl").open("rb") as lines:
        for line in lines:
            await queue.put(orjson.loads(line))
    await queue.put(None)
    await task
    assert done == count
    return count / (time.perf_counter() - start)


def edarun(folder: Path, count: int, traces: str, prefetch: int) -> float:
    traces_spec = "none" if traces == "none" else "file(traces.jsonl)"
    (folder / "bench.yaml").write_text(PIPELINE.format(traces=traces_spec, prefetch=prefetch))
    loaded = load_pipeline(folder / "bench.yaml")
    runner = Runner(loaded, RunOptions(until_idle=True))
    start = time.perf_counter()
    code = event_loop.run(runner.run())
    elapsed = time.perf_counter() - start
    processed = runner.stats.consumers["sink"].processed
    if code != 0 or processed != count:
        sys.exit(f"edarun run failed: exit {code}, processed {processed} of {count}")
    return count / elapsed


FLOOR = "asyncio.Queue pass-through (floor)"
OFF = "edarun memory, tracing off"
ON = "edarun memory, tracing on (file)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_events(folder, args.events)
        (folder / "bench_handlers.py").write_text(HANDLER)
        rows: dict[str, list[float]] = {FLOOR: [], OFF: [], ON: []}
        # Interleaved, so a noisy neighbour slows every row alike rather than one of them.
        for _ in range(args.repeat):
            rows[FLOOR].append(event_loop.run(floor(folder, args.events)))
            rows[OFF].append(edarun(folder, args.events, "none", args.prefetch))
            rows[ON].append(edarun(folder, args.events, "file", args.prefetch))
    base = statistics.median(next(iter(rows.values())))
    loop_name = "asyncio" if os.environ.get("EDARUN_LOOP") == "asyncio" else "uvloop"
    table = Table(title=f"memory throughput, {args.events:,} events, median of {args.repeat}, {loop_name}")
    table.add_column("run")
    table.add_column("events/s", justify="right")
    table.add_column("% of floor", justify="right")
    for name, samples in rows.items():
        rate = statistics.median(samples)
        table.add_row(name, f"{rate:,.0f}", f"{100 * rate / base:.0f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
