"""Watch notification (pattern 4): how long a config change takes to reach every watching service.

A config service and N watchers (each with its own watch queue, as N services would have) run in
this process on the memory broker and/or RabbitMQ. A client sets a value `--changes` times, one
change after the previous one has reached every watcher; a change's latency at a watcher is the
time from the `set` command's publish to the watcher's `changed` callback (the value is in place:
the next handler call sees it). The same clock measures both ends, so no clock skew is involved.

Columns: watchers; p50 / p99 / max latency over every (change, watcher) pair; changes per second
the loop sustained (each change waits for its slowest watcher before the next is set). On
RabbitMQ every change is a confirmed snapshot write, then one confirmed publish per watch queue:
the latency grows with N, as the talk's trade-off says ("- performance").

    python benchmarks/watch.py [--broker memory|amqp|both] [--url amqp://…] [--watchers 2,10,50]
                               [--changes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.brokers import Message, connect_url
from runner.patterns.watch import (
    ConfigService,
    ConfigWatcher,
    config_queue,
    state_queue,
    watch_queue,
)
from runner.telemetry import Tracing

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def measure(url: str, watchers: int, changes: int) -> dict[str, float]:
    broker = connect_url(url)
    await broker.connect(10.0)
    pipeline = f"bench-watch-{os.getpid()}-{os.urandom(3).hex()}"
    names = [f"svc{i}-{pipeline}" for i in range(watchers)]
    tracing = Tracing()
    service = ConfigService(pipeline, {"limit": 0}, broker=broker, tracing=tracing)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    arrived: dict[int, int] = {}
    done = asyncio.Event()

    def changed(key: str, value: object, version: int) -> None:
        if isinstance(value, int) and value in sent_at:
            latencies.append(time.perf_counter() - sent_at[value])
            arrived[value] = arrived.get(value, 0) + 1
            if arrived[value] == watchers:
                done.set()

    views = [
        ConfigWatcher(
            pipeline, name, ["limit"], {"limit": 0}, broker=broker, tracing=tracing, changed=changed
        )
        for name in names
    ]
    try:
        await service.start()
        await asyncio.gather(*(view.start(timeout=10.0) for view in views))
        started = time.perf_counter()
        for value in range(1, changes + 1):
            done.clear()
            body = f'{{"op": "set", "key": "limit", "value": {value}}}'.encode()
            sent_at[value] = time.perf_counter()
            await broker.publish(config_queue(pipeline), Message(body, f"c{value}", pin=b"bench"))
            await asyncio.wait_for(done.wait(), 30.0)
        elapsed = time.perf_counter() - started
    finally:
        for view in views:
            await view.close()
        await service.stop()
        if url != "memory":
            await _delete(
                url,
                [config_queue(pipeline), state_queue(pipeline), *(watch_queue(pipeline, n) for n in names)],
            )
        await broker.close()
    ordered = sorted(latencies)
    return {
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max": ordered[-1] * 1000,
        "rate": changes / elapsed,
    }


async def _delete(url: str, queues: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            await channel.queue_delete(name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=["memory", "amqp", "both"], default="both")
    parser.add_argument("--url", default=AMQP_URL)
    parser.add_argument("--watchers", default="2,10,50")
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    brokers = {"memory": ["memory"], "amqp": [args.url], "both": ["memory", args.url]}[args.broker]
    print(f"{'broker':<10} {'watchers':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'changes/s':>10}")
    for url in brokers:
        for count in (int(n) for n in args.watchers.split(",")):
            row = asyncio.run(measure(url, count, args.changes))
            label = "memory" if url == "memory" else "RabbitMQ"
            print(
                f"{label:<10} {count:>8} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['max']:>8.2f} "
                f"{row['rate']:>10.0f}"
            )


if __name__ == "__main__":
    main()
