"""Watch notification (pattern 4), the talk's way: see the issue, then apply the pattern.

One script of ten steps runs twice, against two implementations of the same idea: a config server
tells the services that watch `max_order` when it changes, and no service keeps a connection open.

1. before (implementations.TalkDemo): the talk's demo, compact and faithful. The config server
   keeps the value and a registry (service -> address) in memory. A service registers when it
   starts (request/reply: it gets the current value) and listens on a queue that lives inside it
   (the talk's embedded, non-persistent broker on the service's own port). A change is pushed,
   without a version, to every registered address; an address nobody listens on is unregistered
   (`Service not found`).
2. after (implementations.WatchPath): edarun's watch path, runner.patterns.watch, on a broker. The
   ConfigService keeps values, versions and registrations as a snapshot on the broker; each
   ConfigWatcher has a durable watch queue of its own; a change is a command on the config
   service's queue, as a relay handler's `ctx.publish(...)` or `edarun config set` sends it.

Every figure comes from the runs: the value each service holds after each step, the depth of the
queues, the registrations each config server has, the copies a watcher set aside as not newer, and
how long each change took from the moment it was sent to the moment the last service applied it.

    .venv/bin/python examples/watch_notification/run.py [--broker amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

from implementations import INITIAL, KEY, MOBILE, PHONE, SERVICES, WEB, Measured, TalkDemo, WatchPath, say

from runner.brokers import connect_url
from runner.runtime.loop import run as run_loop

WIDTH = 100

World = TalkDemo | WatchPath


async def begin(world: World) -> str:
    await world.start_server()
    await world.start(WEB)
    return await world.start(PHONE)


# (what happens, what it does, the value it sends or None). The same for both implementations.
SCRIPT: list[tuple[str, Callable[[World], Awaitable[str]], Any]] = [
    (f"the config server starts ({KEY} = {INITIAL}); {WEB} and {PHONE} start", begin, None),
    (f"set {KEY} = 900", lambda w: w.set(900), 900),
    (f"{PHONE} stops", lambda w: w.stop(PHONE), None),
    (f"set {KEY} = 1100 while {PHONE} is down", lambda w: w.set(1100), 1100),
    (f"{PHONE} starts again", lambda w: w.start(PHONE), None),
    ("the config server stops", lambda w: w.stop_server(), None),
    (f"set {KEY} = 1200 while the config server is down", lambda w: w.set(1200), 1200),
    ("the config server starts again", lambda w: w.start_server(), None),
    (f"{MOBILE} starts", lambda w: w.start(MOBILE), None),
    (f"set {KEY} = 750", lambda w: w.set(750), 750),
]
DOWN_STEP, STOP_STEP, REFUSED_STEP, RESTART_STEP, MOBILE_STEP = 4, 6, 7, 8, 9  # as printed, from 1


async def play(world: World) -> Measured:
    print(f"\n== {world.label}\n")
    measured = world.measured
    for number, (what, action, value) in enumerate(SCRIPT, start=1):
        print(f"  {number:>2}. {what}")
        sent = time.perf_counter()
        note = await action(world)
        pending = await world.settle()
        arrived = [t for _, v, t in measured.applied if v == value and t >= sent]
        if value is not None and arrived:
            measured.latencies.append(max(arrived) - sent)
        note = "; ".join(n for n in (note, pending) if n)
        if note:
            say(f"({note})")
        measured.notes.append(note)
        measured.registered.append(world.registered())
        measured.rows.append(world.row())
    await world.close()
    return measured


COLUMNS = (("step", 4), ("config server", 13), (WEB, 10), (PHONE, 12), (MOBILE, 13))


def table(title: str, measured: Measured) -> str:
    head = "  ".join(f"{name:>{width}}" for name, width in COLUMNS)
    lines = [title, head, "-" * len(head)]
    for number, row in enumerate(measured.rows, start=1):
        lines.append("  ".join(f"{v:>{w}}" for v, (_, w) in zip([str(number), *row], COLUMNS, strict=True)))
    return "\n".join(lines)


def ms(latencies: list[float]) -> str:
    return f"{statistics.median(latencies) * 1000:.2f} ms" if latencies else "-"


def current(measured: Measured) -> int:
    """Services that hold the config server's value at the end."""
    server, *held = measured.rows[-1]
    return sum(1 for value in held if value == server)


def compare(before: Measured, after: Measured) -> list[tuple[str, str, str]]:
    def registrations(m: Measured) -> str:
        return f"{m.registered[STOP_STEP - 2]} before, {m.registered[RESTART_STEP - 1]} after"

    def started_with(m: Measured) -> str:
        return m.rows[MOBILE_STEP - 1][1 + SERVICES.index(MOBILE)]

    return [
        ("on the server's value at the end", f"{current(before)} of 3", f"{current(after)} of 3"),
        (f"change while {PHONE} down", before.notes[DOWN_STEP - 1], after.notes[DOWN_STEP - 1]),
        ("change while config server down", before.notes[REFUSED_STEP - 1],
         after.notes[REFUSED_STEP - 1]),
        (f"{WEB} once the server is back", before.rows[RESTART_STEP - 1][1],
         after.rows[RESTART_STEP - 1][1]),
        ("registrations before/after restart", registrations(before), registrations(after)),
        (f"{MOBILE} began with", started_with(before), started_with(after)),
        ("copies set aside as not newer", "no versions", str(after.ignored or 0)),
        ("change to last service, median", ms(before.latencies), ms(after.latencies)),
    ]  # fmt: skip


def print_comparison(rows: list[tuple[str, str, str]]) -> None:
    first = max(len(r[0]) for r in rows)
    second = max(len(r[1]) for r in [*rows, ("", "before", "")])
    print(f"{'':<{first}}  {'before':<{second}}  after")
    print("-" * (first + second + 4 + max(len(r[2]) for r in rows)))
    for what, before, after in rows:
        print(f"{what:<{first}}  {before:<{second}}  {after}")


async def remove_queues(url: str, names: list[str]) -> None:
    """RabbitMQ keeps durable queues after the run: remove this run's (the broker protocol has no
    delete, since edarun itself never deletes a queue)."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


def claims(before: Measured, after: Measured) -> list[str]:
    """What the closing words say, checked against the runs; the words that fail it, if any."""
    failed = []
    checks = {
        f"before: {PHONE} is unregistered while down": "unregistered" in before.notes[DOWN_STEP - 1],
        "before: the restarted config server has no registrations": before.registered[RESTART_STEP - 1] == 0,
        f"before: {MOBILE} began with the initial value": before.rows[MOBILE_STEP - 1][3] == str(INITIAL),
        "before: some service ends on another value than the server's": current(before) < len(SERVICES),
        f"after: the change waited in {PHONE}'s watch queue": "waiting in" in after.notes[DOWN_STEP - 1],
        "after: the command waited for the config server": "queued on" in after.notes[REFUSED_STEP - 1],
        "after: the restarted config server kept the registrations": (
            after.registered[RESTART_STEP - 1] == after.registered[STOP_STEP - 2] == 2
        ),
        "after: every service ends on the server's value": current(after) == len(SERVICES),
    }
    for claim, holds in checks.items():
        if not holds:
            failed.append(claim)
    return failed


async def main(url: str) -> int:
    logging.getLogger("edarun").setLevel(logging.ERROR)  # the demo prints its own lines
    before = await play(TalkDemo())
    broker = connect_url(url)
    await broker.connect(10.0)
    path = WatchPath(broker, "" if url == "memory" else f"-{os.getpid()}-{os.urandom(2).hex()}")
    try:
        after = await play(path)
    finally:
        await broker.close()
        if url != "memory":
            await remove_queues(url, path.queues())

    print(f"\n{table('before: what each holds after each step', before)}\n")
    print(f"{table(f'after, on {broker.url}: what each holds after each step (vN: version N)', after)}\n")
    print_comparison(compare(before, after))
    print()
    print(textwrap.fill(
        f"In the talk's demo {current(before)} of 3 services ended on the config server's value. "
        f"{PHONE} was unregistered while it was down and caught up only because it registered again "
        "when it came back. The restarted config server had forgotten both the registrations and the "
        f"value: the services that had registered before never heard from it again, and {MOBILE}, "
        f"which started after the restart, began with {INITIAL}. With watch queues all "
        f"{current(after)} ended on it: the change waited in {PHONE}'s own queue, the command sent "
        "while the config server was down waited in its queue, and the registrations and the value "
        "came back with the snapshot on the broker. The price is time: the median change reached "
        f"its last service in {ms(after.latencies)} instead of {ms(before.latencies)}, through the "
        "broker and a saved snapshot.", WIDTH,
    ))  # fmt: skip
    failed = claims(before, after)
    for claim in failed:
        print(f"not as claimed: {claim}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="memory", help="memory (default) or amqp://user:pass@host:5672/")
    sys.exit(run_loop(main(parser.parse_args().broker)))
