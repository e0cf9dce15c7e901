"""Multi-broker (pattern 9): N events through one RabbitMQ broker against the same through two.

The second broker is a RabbitMQ node this script starts beside the machine's (tools/rabbitmq_node.py:
its own folder, node name and port) and stops at the end, also when a run failed. Every row is the
real CLI, `python -m runner up PIPELINE --until-idle --report FILE` (one OS process per service),
moving the same N events (a JSONL file) from a producer to a consumer through fresh durable queues;
the handler records `time.time() - sent_at`, as in amqp_throughput.py (their plugin is shared):

  1. one broker: the machine's node (A);
  2. one broker: the node started here (B), alone, to show the two nodes are alike;
  3. two brokers, A + B, `spread: round_robin`: the producer alternates, the consumer reads both;
  4. and 5. rows 1 and 3 with the consumer in two processes (`instances: 2`).

Besides events/s, each row gives the CPU time per event of the producer process, of the consumer
process(es) and of the broker nodes (user + system time of their Erlang VMs over the run, from
/proc), which says where the time goes: a second broker only helps when the brokers are the
bottleneck, and on a small machine the Python services are (the cores are shared by all of them).

    python benchmarks/multi_broker.py [--events 30000] [--repeat 3] [--prefetch 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import amqp_bench_plugin as plugin
from amqp_throughput import BenchError, Result, cleanup, reset, summarise, write_events
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from rabbitmq_node import RabbitNode  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 180)
TICKS = os.sysconf("SC_CLK_TCK")

PIPELINE = """\
version: 1
name: multi-bench
brokers: {brokers}
plugins: [.]
telemetry: {{traces: none}}
producers:
  feed: {{source: "amqp_bench_plugin:source", to: {queue}}}
consumers:
  {consumer}:
    {{from: {queue}, handler: "amqp_bench_plugin:record", prefetch: {prefetch}, instances: {instances}}}
"""


@dataclass(frozen=True)
class Variant:
    name: str
    brokers: tuple[str, ...]  # "A" (the machine's node) and/or "B" (ours)
    instances: int = 1


VARIANTS = (
    Variant("one broker (A)", ("A",)),
    Variant("one broker (B)", ("B",)),
    Variant("two brokers (A + B)", ("A", "B")),
    Variant("one broker (A), 2 consumer processes", ("A",), 2),
    Variant("two brokers (A + B), 2 consumer processes", ("A", "B"), 2),
)


@dataclass
class Row:
    result: Result
    broker_cpu_us: float  # CPU time of the broker nodes over the run, per event


def beam_pid(port: int) -> int:
    """The Erlang VM listening on `port` (a RabbitMQ node)."""
    found = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    for part in found.stdout.split("pid=")[1:]:
        return int(part.split(",")[0])
    raise BenchError(f"no process listens on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run(variant: Variant, urls: dict[str, str], pids: list[int], work: Path, args: argparse.Namespace) -> Row:
    tag = f"{os.getpid()}-{'-'.join(variant.brokers)}-{variant.instances}"
    queue, consumer = f"multi-bench-{tag}", f"sink-{tag}"
    folder = work / tag
    shutil.rmtree(folder, ignore_errors=True)
    out = folder / "records"
    out.mkdir(parents=True)
    shutil.copy(HERE / "amqp_bench_plugin.py", folder / "amqp_bench_plugin.py")
    brokers = [urls[b] for b in variant.brokers]
    pipeline = folder / "bench.yaml"
    pipeline.write_text(
        PIPELINE.format(
            brokers=json.dumps(brokers),
            queue=queue,
            consumer=consumer,
            prefetch=args.prefetch,
            instances=variant.instances,
        )
    )
    queues = [queue, f"{consumer}.dashboard"]
    for url in brokers:
        reset(url, queues)
    report = folder / "report.json"
    env = {**os.environ, plugin.EVENTS_ENV: str(work / "events.jsonl"), plugin.OUT_ENV: str(out)}
    command = [sys.executable, "-m", "runner", "up", str(pipeline), "--until-idle", "--report", str(report)]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        wall = time.perf_counter() - start
        broker_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        for url in brokers:
            cleanup(url, queues)
    if done.returncode != 0 or not report.exists():
        raise BenchError(f"{variant.name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return Row(summarise(out, args.events, wall, variant.name), 1e6 * broker_cpu / args.events)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row, interleaved; the median")
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    rows: dict[str, list[Row]] = {}
    failed: dict[str, str] = {}
    with RabbitNode("edarun-bench-b") as node, tempfile.TemporaryDirectory(prefix="multi-bench-") as tmp:
        urls = {"A": args.url, "B": node.url}
        pids = [beam_pid(int(args.url.split(":")[-1].split("/")[0])), beam_pid(node.port)]
        work = Path(tmp)
        write_events(work / "events.jsonl", args.events)
        console.print(f"A = {args.url.replace('guest:guest@', '')}, B = {node.node} on port {node.port}")
        for round_ in range(1, args.repeat + 1):
            for variant in VARIANTS:
                if variant.name in failed:
                    continue
                console.print(f"[dim]round {round_}: {variant.name}…[/dim]")
                try:
                    rows.setdefault(variant.name, []).append(run(variant, urls, pids, work, args))
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    failed[variant.name] = str(exc)
                    console.print(f"[red]{variant.name} failed: {exc}[/red]")
    print_table(rows, failed, args)
    if failed:
        sys.exit("some rows failed; see above")


def print_table(rows: dict[str, list[Row]], failed: dict[str, str], args: argparse.Namespace) -> None:
    def median(samples: list[Row], field: str) -> float:
        return statistics.median(getattr(s.result, field) for s in samples)

    table = Table(
        title=f"One RabbitMQ broker vs two, {args.events:,} events, prefetch {args.prefetch}, "
        f"median of {args.repeat}",
        caption="elapsed = first publish → last handler call; CPU µs/ev = user + system CPU time per event "
        "of the producer process, the consumer process(es), and both brokers' Erlang VMs over the run",
    )
    columns = ("run", "elapsed s", "events/s", "vs one broker", "p50 ms", "p99 ms", "wall s")
    for column in (*columns, "producer CPU µs/ev", "consumer CPU µs/ev", "broker CPU µs/ev"):
        table.add_column(column, justify="left" if column == "run" else "right")
    base = {1: rows.get(VARIANTS[0].name), 2: rows.get(VARIANTS[3].name)}
    for variant in VARIANTS:
        samples = rows.get(variant.name)
        if not samples:
            table.add_row(variant.name, *["—"] * 9)
            continue
        rate = statistics.median(s.result.events / s.result.elapsed for s in samples)
        reference = base[variant.instances]
        ratio = "—"
        if reference:
            ratio = f"{rate / statistics.median(s.result.events / s.result.elapsed for s in reference):.2f}x"
        table.add_row(
            variant.name + (" [red](failed a run)[/red]" if variant.name in failed else ""),
            f"{median(samples, 'elapsed'):.2f}",
            f"{rate:,.0f}",
            ratio,
            f"{median(samples, 'p50_ms'):,.0f}",
            f"{median(samples, 'p99_ms'):,.0f}",
            f"{median(samples, 'wall'):.1f}",
            f"{median(samples, 'producer_cpu_us'):,.0f}",
            f"{median(samples, 'consumer_cpu_us'):,.0f}",
            f"{statistics.median(s.broker_cpu_us for s in samples):,.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
