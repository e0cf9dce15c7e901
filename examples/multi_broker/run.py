"""Multi-broker (pattern 9), the talk's way: see the issue, then apply the pattern.

One broker is a single point of failure: while it is down, producers cannot publish and consumers
have nothing to take. The same order flow (6,000 orders at 1,500 a second, a producer and a
consumer, each in its own process as `edarun up` runs them on RabbitMQ) runs three times:

  1. baseline: one broker, nothing stopped;
  2. the issue: one broker, stopped (`rabbitmqctl stop_app`) 1.5 s into the run, started 4 s later;
  3. the pattern: two brokers (`brokers: [A, B]`), B stopped and started the same way.

The broker that is stopped is a RabbitMQ node this script starts itself (tools/rabbitmq_node.py:
its own folder, node name and port), and stops at the end: the machine's broker (A, 127.0.0.1:5672)
is never stopped. Every figure comes from the run: the report (`--report`) and the order taker's
log, one line per handler call with the broker it came from and the time. It exits 1 if an order
was lost, or if the outage did not show (one broker kept working, or two brokers stopped).

    .venv/bin/python examples/multi_broker/run.py     # about 40 seconds; needs RabbitMQ on :5672
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aio_pika

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from rabbitmq_node import RabbitNode  # noqa: E402

BROKER_A = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
EVENTS = 6_000
STOP_AFTER_S, DOWN_FOR_S = 1.5, 4.0
WIDTH = 100


@dataclass
class Outcome:
    run: str
    brokers: str
    published: int  # report
    lost: int  # published, never handled
    duplicates: int  # handler calls beyond the first of an order
    during: int  # handler calls while the stopped broker was down
    from_each: str  # handler calls per broker
    seconds: float  # report: elapsed_s


def clear(url: str, queues: list[str]) -> None:
    async def go() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            for queue in queues:
                channel = await connection.channel()
                await channel.queue_delete(queue)

    asyncio.run(go())


def run(name: str, pipeline: str, node: RabbitNode, work: Path, *, outage: bool) -> Outcome:
    log, report = work / f"{name}.log", work / f"{name}.json"
    queue = f"multi-broker-demo-{os.getpid()}"
    queues = [queue, "order-taker.dashboard"]
    urls = [BROKER_A, node.url]
    for url in urls:
        clear(url, queues)
    env = {
        **os.environ, "BROKER_A": BROKER_A, "BROKER_B": node.url, "QUEUE": queue,
        "OUTAGE_LOG": str(log), "OUTAGE_EVENTS": str(EVENTS),
    }  # fmt: skip
    command = [sys.executable, "-m", "runner", "up", str(HERE / pipeline), "--until-idle"]
    up = subprocess.Popen(
        [*command, "--report", str(report)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=(work / f"{name}.err").open("wb"),
    )  # fmt: skip
    down = (0.0, 0.0)
    try:
        if outage:
            while not log.exists() or log.stat().st_size == 0:  # the flow has started
                time.sleep(0.05)
            time.sleep(STOP_AFTER_S)
            node.stop_app()
            stopped = time.time()
            time.sleep(DOWN_FOR_S)
            down = (stopped, time.time())
            node.start_app()
        code = up.wait(timeout=180)
    finally:
        if up.poll() is None:
            up.kill()
        for url in urls:
            clear(url, queues)
    if code != 0:
        raise SystemExit(f"{name}: edarun up exited {code}:\n{(work / f'{name}.err').read_text()[-2000:]}")
    data = json.loads(report.read_text())
    calls = [line.split() for line in log.read_text().splitlines()]
    ids = Counter(int(ident) for ident, _, _ in calls)
    times = [float(at) for _, _, at in calls]
    brokers = Counter("B" if broker.endswith(f":{node.port}/") else "A" for _, broker, _ in calls)
    published = data["producers"]["order-feed"]["published"]
    return Outcome(
        run=name,
        brokers="A + B" if pipeline.startswith("two") else "B",
        published=published,
        lost=published - len(ids),
        duplicates=len(calls) - len(ids),
        during=sum(1 for at in times if down[0] < at < down[1]),
        from_each=" / ".join(f"{b} {brokers[b]}" for b in sorted(brokers)),
        seconds=data["elapsed_s"],
    )


def main() -> None:
    outcomes = []
    with RabbitNode("edarun-demo-b") as node, tempfile.TemporaryDirectory(prefix="multi-broker-") as tmp:
        work = Path(tmp)
        print(f"A = {BROKER_A.split('@')[-1]} (the machine's broker), B = {node.node} on port {node.port}")
        plan = [
            ("baseline: one broker", "one_broker.yaml", False),
            ("issue: one broker, stopped", "one_broker.yaml", True),
            ("pattern: two brokers, B stopped", "two_brokers.yaml", True),
        ]
        for name, pipeline, outage in plan:
            print(f"running {name} …", flush=True)
            threading.Event().wait(0.5)  # let the previous run's connections go
            outcomes.append(run(name, pipeline, node, work, outage=outage))
    print()
    header = (
        f"{'run':<33}{'brokers':>8}{'published':>11}{'lost':>6}{'dupes':>7}{'handled while down':>20}"
        f"{'seconds':>9}  handled from"
    )
    print(header)
    print("-" * WIDTH)
    for o in outcomes:
        print(
            f"{o.run:<33}{o.brokers:>8}{o.published:>11,}{o.lost:>6}{o.duplicates:>7}{o.during:>20,}"
            f"{o.seconds:>9.1f}  {o.from_each}"
        )
    print(
        f"\nThe outage: B stopped {STOP_AFTER_S:g} s into the run, started again {DOWN_FOR_S:g} s later. "
        "'handled while down' counts\nhandler calls in that window; 'seconds' is the run's, from the "
        "report: it ends once B's orders are handled too."
    )
    _, issue, pattern = outcomes
    if any(o.lost or o.published != EVENTS for o in outcomes):
        raise SystemExit("an order was lost")
    if issue.during or not pattern.during or "B" not in pattern.from_each:
        raise SystemExit("the outage did not show: one broker kept working, or two brokers did not")


if __name__ == "__main__":
    main()
