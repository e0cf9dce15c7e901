"""End-to-end events/s and latency on RabbitMQ: edarun against hand-written aio-pika and FastStream.

Every variant moves the same N events (a JSONL file) from a producer process to a consumer process
through its own fresh durable queue, and the consumer's handler records `time.time() - sent_at`
(`sent_at` is stamped as the producer takes the event, just before publishing it):

  1. edarun at-least-once: the real CLI, `python -m runner up PIPELINE --broker URL --until-idle
     --report FILE` (one OS process per service); the producer's source is a `module:function`
     that reads the JSONL file and stamps `sent_at` (a `file(...)` source cannot stamp it).
  2. edarun at-most-once: the same with `delivery: at_most_once` on the consumer (which acks on
     receipt; the producer still publishes persistent messages with confirms).
  3. aio-pika at-least-once, hand-written best practice: robust connection, durable queue,
     persistent messages, publisher confirms pipelined (a window of 256 publishes in flight),
     consumer with the same prefetch and acks after the handler, batched with multiple=True.
  4. aio-pika at-most-once: no confirms, transient messages, a no_ack consumer.
  5. FastStream RabbitBroker: `broker.publish(event, queue, persist=True)` on its default channel
     (publisher confirms on), 256 publishes in flight; a subscriber with FastStream's default ack
     policy (REJECT_ON_ERROR: ack after the handler), the same prefetch, logger=None.

Elapsed is first publish → last handler call, from the recorded timestamps (process start-up is
not in it); "wall s" is the whole command or both processes, start-up and shutdown included.
The hand-written and FastStream variants run on the default asyncio loop; edarun runs on uvloop,
which it installs and uses by default (run with EDARUN_LOOP=asyncio to compare on asyncio).

    pip install -e '.[bench]'   # FastStream (its row says so when it is missing)
    python benchmarks/amqp_throughput.py [--events 50000] [--repeat 1] [--url amqp://…]

The handler is trivial, so this measures the messaging path. On a small machine RabbitMQ, the producer
and the consumer share the cores, so the CPU µs per event of each process is the steadier number;
p50/p99 include queueing whenever the producer outruns the consumer (it publishes as fast as its
confirm window allows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika
import amqp_bench_plugin as plugin
import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
PUBLISH_WINDOW = 256  # publishes in flight awaiting their confirms (edarun's window is 256 too)

PIPELINE = """\
version: 1
name: amqp-bench
broker: {url}
plugins: [.]
telemetry: {{traces: none}}
producers:
  feed: {{source: "amqp_bench_plugin:source", to: {queue}}}
consumers:
  {consumer}:
    from: {queue}
    handler: amqp_bench_plugin:record
    prefetch: {prefetch}
    delivery: {delivery}
"""

console = Console(width=None if sys.stdout.isatty() else 180)


class BenchError(RuntimeError):
    """A variant that did not process every event, or failed."""


@dataclass
class Result:
    events: int
    elapsed: float  # first publish → last handler call
    p50_ms: float
    p99_ms: float
    wall: float
    first_wait_ms: float  # first publish → first handler call (consumer start-up shows here)
    producer_cpu_us: float  # CPU time of the producer process per event, from its first event on
    consumer_cpu_us: float  # CPU time of the consumer process per event, from its first handler call on


def summarise(folder: Path, count: int, wall: float, variant: str) -> Result:
    records = plugin.load(folder)
    if len(records) != count or len(set(records.ids)) != count:
        raise BenchError(
            f"{variant}: {len(records)} handler calls for {len(set(records.ids))} distinct events, "
            f"expected {count} of each"
        )
    latencies = sorted(r - s for r, s in zip(records.recv, records.sent, strict=True))
    first_sent = min(records.sent)
    return Result(
        events=count,
        elapsed=max(records.recv) - first_sent,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[min(int(0.99 * len(latencies)), len(latencies) - 1)],
        wall=wall,
        first_wait_ms=1000 * (min(records.recv) - first_sent),
        producer_cpu_us=1e6 * plugin.cpu(folder, "*.producer-cpu") / count,
        consumer_cpu_us=1e6 * plugin.cpu(folder, "*.cpu") / count,
    )


def write_events(path: Path, count: int) -> None:
    with path.open("wb") as out:
        for i in range(count):
            event = {
                "id": i,
                "account": f"A-{i % 97}",
                "side": "BUY",
                "symbol": "AAPL",
                "shares": 100 + i % 900,
            }
            out.write(orjson.dumps(event) + b"\n")


# -- queues ---------------------------------------------------------------------------------------


async def _reset(url: str, queues: list[str], declare: bool) -> None:
    """Delete `queues`, then (with `declare`) declare the first one afresh, durable."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        if declare:
            await channel.declare_queue(queues[0], durable=True)


def reset(url: str, queues: list[str], *, declare: bool = False) -> None:
    asyncio.run(_reset(url, queues, declare))


def cleanup(url: str, queues: list[str]) -> None:
    """Delete a run's queues; a broker that is away then is reported, not raised over the result."""
    try:
        reset(url, queues)
    except Exception as exc:
        console.print(f"[yellow]could not delete {queues}: {exc!r}[/yellow]")


async def _server_version(url: str) -> str:
    connection = await aio_pika.connect(url)
    async with connection:
        properties = connection.transport.connection.server_properties
        return str(properties.get("version", "?"))


# -- edarun (the real CLI, one process per service) ---------------------------------------------


def run_edarun(work: Path, url: str, count: int, prefetch: int, delivery: str, tag: str) -> Result:
    variant = f"edarun {delivery}"
    queue = f"amqp-bench-{tag}-edarun-{delivery}"
    consumer = f"sink-{tag}-{delivery}"
    folder = work / f"edarun-{delivery}"
    shutil.rmtree(folder, ignore_errors=True)  # a run again after a failed one starts afresh
    out = folder / "records"
    out.mkdir(parents=True)
    shutil.copy(HERE / "amqp_bench_plugin.py", folder / "amqp_bench_plugin.py")
    pipeline = folder / "bench.yaml"
    pipeline.write_text(
        PIPELINE.format(url=url, queue=queue, consumer=consumer, prefetch=prefetch, delivery=delivery)
    )
    report = folder / "report.json"
    queues = [queue, f"{consumer}.dashboard"]
    reset(url, queues)
    env = {**os.environ, plugin.EVENTS_ENV: str(work / "events.jsonl"), plugin.OUT_ENV: str(out)}
    command = [sys.executable, "-m", "runner", "up", str(pipeline), "--broker", url, "--until-idle"]
    command += ["--report", str(report)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120 + count / 200
        )
    finally:
        wall = time.perf_counter() - start
        cleanup(url, queues)
    log = "\n".join(done.stderr.splitlines()[-15:])
    if done.returncode != 0 or not report.exists():
        raise BenchError(f"{variant}: exit {done.returncode}\n{done.stdout[-2000:]}\n{log}")
    summary = json.loads(report.read_text())
    published = summary["producers"]["feed"]["published"]
    processed = summary["consumers"][consumer]["processed"]
    if published != count or processed != count:
        redelivered = sum(int(f.read_text()) for f in out.glob("*.redelivered"))
        raise BenchError(
            f"{variant}: published {published}, processed {processed} (of which {redelivered} "
            f"redelivered), expected {count}; the run's log ends:\n{log}"
        )
    return summarise(out, count, wall, variant)


# -- hand-written aio-pika and FastStream: a producer process and a consumer process --------------


async def _publish_windowed(events: str, publish: Callable[[dict[str, Any]], Any]) -> int:
    """Publish every event with at most PUBLISH_WINDOW confirms in flight; the number confirmed."""
    room = asyncio.Semaphore(PUBLISH_WINDOW)
    pending: set[asyncio.Task[Any]] = set()
    errors: list[BaseException] = []
    confirmed = 0

    def finished(task: asyncio.Task[Any]) -> None:
        nonlocal confirmed
        pending.discard(task)
        room.release()
        if task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]
        else:
            confirmed += 1

    for event in _pulled(events):
        await room.acquire()
        event["sent_at"] = time.time()  # stamped when there is room to publish it
        task = asyncio.ensure_future(publish(event))
        pending.add(task)
        task.add_done_callback(finished)
    if pending:
        await asyncio.wait(pending)
    if errors:
        raise BenchError(f"{len(errors)} publishes failed, the first: {errors[0]!r}")
    return confirmed


def _pulled(events: str) -> Any:
    with open(events, "rb") as lines:
        for line in lines:
            yield orjson.loads(line)


async def _aiopika_produce(url: str, queue: str, out: str, events: str, confirms: bool) -> int:
    connection = await aio_pika.connect_robust(url)
    cpu_start = time.process_time()
    try:
        return await _aiopika_publish(connection, queue, events, confirms)
    finally:
        await connection.close()
        plugin.write_cpu(Path(out) / "producer.producer-cpu", cpu_start)


async def _aiopika_publish(connection: Any, queue: str, events: str, confirms: bool) -> int:
    channel = await connection.channel(publisher_confirms=confirms)
    exchange = channel.default_exchange
    mode = aio_pika.DeliveryMode.PERSISTENT if confirms else aio_pika.DeliveryMode.NOT_PERSISTENT
    ids = iter(range(1, 1 << 62))

    def message(event: dict[str, Any]) -> aio_pika.Message:
        body = orjson.dumps(event)
        return aio_pika.Message(
            body, delivery_mode=mode, message_id=str(next(ids)), content_type="application/json"
        )

    if confirms:
        return await _publish_windowed(
            events, lambda event: exchange.publish(message(event), routing_key=queue)
        )
    sent = 0
    for event in _pulled(events):
        event["sent_at"] = time.time()
        await exchange.publish(message(event), routing_key=queue)  # returns once written
        sent += 1
    return sent


class BatchAcks:
    """Acks after the handler, batched: one basic.ack(multiple=True) per loop iteration for the
    settled prefix of delivery tags (one consumer per channel, so tags run 1, 2, 3, …)."""

    def __init__(self) -> None:
        self.next_tag = 1
        self.done: set[int] = set()
        self.channel: Any = None
        self.scheduled = False
        self.sending: set[asyncio.Task[Any]] = set()
        self.error: BaseException | None = None

    def settle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.channel = message.channel
        self.done.add(message.delivery_tag or 0)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        highest = None
        while self.next_tag in self.done:
            self.done.discard(self.next_tag)
            highest = self.next_tag
            self.next_tag += 1
        if highest is not None:
            task = asyncio.ensure_future(self.channel.basic_ack(highest, multiple=True))
            self.sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self.sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.error = task.exception()

    async def drain(self) -> None:
        self.flush()
        if self.sending:
            await asyncio.gather(*self.sending, return_exceptions=True)
        if self.error is not None:
            raise BenchError(f"an ack failed: {self.error!r}")


async def _aiopika_consume(
    url: str, queue: str, count: int, prefetch: int, no_ack: bool, out: str, ready: Any, timeout: float
) -> None:
    recorder = plugin.Recorder()
    finished = asyncio.Event()
    acks = BatchAcks()
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        amqp_queue = await channel.declare_queue(queue, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            recorder.record(orjson.loads(message.body))  # the handler
            if not no_ack:
                acks.settle(message)
            if len(recorder) >= count:
                finished.set()

        tag = await amqp_queue.consume(on_message, no_ack=no_ack)
        ready.set()
        await asyncio.wait_for(finished.wait(), timeout)
        await amqp_queue.cancel(tag)
        await acks.drain()
    recorder.dump(out)  # only once every event was handled (and, with acks, acknowledged)


def aiopika_producer(*args: Any) -> None:
    asyncio.run(_aiopika_produce(*args))


def aiopika_consumer(*args: Any) -> None:
    asyncio.run(_aiopika_consume(*args))


async def _faststream_produce(url: str, queue: str, out: str, events: str) -> int:
    from faststream.rabbit import RabbitBroker, RabbitQueue

    broker = RabbitBroker(url, logger=None)  # default channel: publisher_confirms=True
    target = RabbitQueue(queue, durable=True)
    await broker.connect()
    cpu_start = time.process_time()
    try:
        return await _publish_windowed(events, lambda event: broker.publish(event, target, persist=True))
    finally:
        await broker.stop()
        plugin.write_cpu(Path(out) / "producer.producer-cpu", cpu_start)


async def _faststream_consume(
    url: str, queue: str, count: int, prefetch: int, out: str, ready: Any, timeout: float
) -> None:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    recorder = plugin.Recorder()
    finished = asyncio.Event()
    broker = RabbitBroker(url, logger=None)

    # Default ack policy (REJECT_ON_ERROR): ack once the handler returned.
    @broker.subscriber(RabbitQueue(queue, durable=True), channel=Channel(prefetch_count=prefetch))
    async def handle(event: dict[str, Any]) -> None:
        recorder.record(event)
        if len(recorder) >= count:
            finished.set()

    await broker.start()
    try:
        ready.set()
        await asyncio.wait_for(finished.wait(), timeout)
    finally:
        await broker.stop()
    recorder.dump(out)


def faststream_producer(*args: Any) -> None:
    asyncio.run(_faststream_produce(*args))


def faststream_consumer(*args: Any) -> None:
    asyncio.run(_faststream_consume(*args))


Pair = tuple[Callable[..., None], tuple[Any, ...]]  # a process's entry point and its own arguments


def run_pair(
    work: Path, url: str, count: int, variant: str, slug: str, producer: Pair, consumer: Pair
) -> Result:
    """The consumer process first (ready once consuming), then the producer process."""
    queue = f"amqp-bench-{slug}"
    folder = work / slug
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    timeout = 120 + count / 200
    reset(url, [queue], declare=True)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    start = time.perf_counter()
    processes = []
    try:
        args = (url, queue, count, *consumer[1], str(folder / "records.bin"), ready, timeout)
        processes.append(spawn.Process(target=consumer[0], args=args, name=f"{slug} consumer"))
        processes[0].start()
        if not ready.wait(60):
            raise BenchError(f"{variant}: the consumer did not start")
        processes.append(
            spawn.Process(
                target=producer[0], args=(url, queue, str(folder), *producer[1]), name=f"{slug} producer"
            )
        )
        processes[1].start()
        for process in reversed(processes):  # the producer first: when it fails, stop at once
            process.join(timeout)
            if process.exitcode != 0:
                raise BenchError(f"{variant}: {process.name} exited with {process.exitcode}")
        wall = time.perf_counter() - start
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        cleanup(url, [queue])
    return summarise(folder, count, wall, variant)


# -- the run --------------------------------------------------------------------------------------

EDA_ALO = "edarun at-least-once"
EDA_AMO = "edarun at-most-once"
PIKA_ALO = "aio-pika at-least-once"
PIKA_AMO = "aio-pika at-most-once"
FAST = "FastStream at-least-once"


def variants(work: Path, url: str, count: int, prefetch: int, tag: str) -> dict[str, Callable[[], Result]]:
    events = str(work / "events.jsonl")

    def pair(name: str, slug: str, producer: Pair, consumer: Pair) -> Callable[[], Result]:
        return lambda: run_pair(work, url, count, name, f"{tag}-{slug}", producer, consumer)

    return {
        EDA_ALO: lambda: run_edarun(work, url, count, prefetch, "at_least_once", tag),
        EDA_AMO: lambda: run_edarun(work, url, count, prefetch, "at_most_once", tag),
        PIKA_ALO: pair(
            PIKA_ALO, "pika-alo", (aiopika_producer, (events, True)), (aiopika_consumer, (prefetch, False))
        ),
        PIKA_AMO: pair(
            PIKA_AMO, "pika-amo", (aiopika_producer, (events, False)), (aiopika_consumer, (prefetch, True))
        ),
        FAST: pair(FAST, "faststream", (faststream_producer, (events,)), (faststream_consumer, (prefetch,))),
    }


def versions(url: str) -> str:
    try:
        faststream_version = metadata.version("faststream")
    except metadata.PackageNotFoundError:
        faststream_version = "not installed"
    rabbit = asyncio.run(_server_version(url))
    cores = os.cpu_count()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cores = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    edarun_loop = os.environ.get("EDARUN_LOOP", "uvloop")
    return (
        f"python {platform.python_version()} · aio-pika {aio_pika.__version__} · "
        f"faststream {faststream_version} · RabbitMQ {rabbit} · nproc {cores} · "
        f"loop: edarun {edarun_loop}, the others asyncio"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per row, interleaved; the median is shown"
    )
    parser.add_argument("--prefetch", type=int, default=200, help="every consumer's prefetch (edarun's too)")
    parser.add_argument("--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        help="run a failed variant again, up to this many times (for a broker that others restart); "
        "every failure is still printed and the row is marked",
    )
    parser.add_argument("--only", nargs="*", help="run just the variants whose name contains one of these")
    args = parser.parse_args()
    console.print(versions(args.url))
    try:
        import faststream  # noqa: F401
    except ImportError:
        faststream_missing = True
    else:
        faststream_missing = False
    tag = str(os.getpid())
    results: dict[str, list[Result]] = {}
    failed: dict[str, str] = {}
    retried: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="amqp-bench-") as tmp:
        work = Path(tmp)
        write_events(work / "events.jsonl", args.events)
        runs = variants(work, args.url, args.events, args.prefetch, tag)
        if args.only:
            runs = {name: run for name, run in runs.items() if any(o in name for o in args.only)}
        if faststream_missing:
            runs.pop(FAST, None)
            failed[FAST] = "faststream[rabbit] is not installed"
        # Interleaved, so a noisy neighbour slows every row alike rather than one of them.
        for round_ in range(1, args.repeat + 1):
            for name, run in runs.items():
                for attempt in range(args.retries + 1):
                    if name in failed:
                        break
                    console.print(f"[dim]round {round_}: {name}…[/dim]")
                    try:
                        result = run()
                    except Exception as exc:  # a failed variant is reported, the others still run
                        error = f"{type(exc).__name__}: {exc}"
                        console.print(f"[red]{name} failed: {error}[/red]")
                        if attempt == args.retries:
                            failed[name] = error
                        else:
                            retried[name] = retried.get(name, 0) + 1
                        continue
                    results.setdefault(name, []).append(result)
                    break
    print_table(results, failed, retried, args)
    if any(name in failed for name in runs):
        sys.exit("some variants failed; see above")


def print_table(
    results: dict[str, list[Result]],
    failed: dict[str, str],
    retried: dict[str, int],
    args: argparse.Namespace,
) -> None:
    def median(samples: list[Result], field: str) -> float:
        return statistics.median(getattr(r, field) for r in samples)

    base = median(results[PIKA_ALO], "elapsed") if PIKA_ALO in results else None
    table = Table(
        title=f"RabbitMQ end to end, {args.events:,} events, prefetch {args.prefetch}, "
        f"median of {args.repeat}",
        caption="elapsed = first publish → last handler call; wall = the whole command (start-up, "
        "idle detection, shutdown); 1st wait = first publish → first handler call;\nCPU µs/ev = user + "
        "system CPU time of that process from its first event to its exit, per event; "
        "vs hand-written = events/s ratio",
    )
    columns = ("variant", "events", "elapsed s", "events/s", "p50 ms", "p99 ms", "wall s", "1st wait ms")
    for column in (*columns, "prod CPU µs/ev", "cons CPU µs/ev"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_column("vs hand-written at-least-once", justify="right")
    for name in (EDA_ALO, EDA_AMO, PIKA_ALO, PIKA_AMO, FAST):
        if name in failed and name not in results:
            table.add_row(name, *["—"] * 9, failed[name].splitlines()[0][:60])
            continue
        if name not in results:
            continue
        samples = results[name]
        elapsed = median(samples, "elapsed")
        rate = statistics.median(r.events / r.elapsed for r in samples)
        ratio = f"{base / elapsed:.2f}x" if base else "—"
        table.add_row(
            name
            + (" [red](failed a run)[/red]" if name in failed else "")
            + (f" [yellow](after {retried[name]} failed)[/yellow]" if name in retried else ""),
            f"{samples[0].events:,}",
            f"{elapsed:.2f}",
            f"{rate:,.0f}",
            f"{median(samples, 'p50_ms'):,.1f}",
            f"{median(samples, 'p99_ms'):,.1f}",
            f"{median(samples, 'wall'):.2f}",
            f"{median(samples, 'first_wait_ms'):,.0f}",
            f"{median(samples, 'producer_cpu_us'):,.0f}",
            f"{median(samples, 'consumer_cpu_us'):,.0f}",
            ratio,
        )
    console.print(table)


if __name__ == "__main__":
    main()
