"""Watch notification (pattern 4), the talk's way: see the issue, then apply the pattern.

One script of nine steps runs twice, against two implementations of the same idea (a config server
that tells the services watching `max_order` when it changes, with no connection kept open):

1. before: the talk's demo, compact and faithful. The config server keeps the value and a registry
   (service -> address) in memory. A service registers when it starts (request/reply: it gets the
   current value) and listens on a queue that lives inside it (the talk's embedded, non-persistent
   broker on the service's own port). A change is pushed, without a version, to every registered
   address; one nobody listens on is unregistered (`Service not found`).
2. after: edarun's watch path (runner.patterns.watch) on a broker: the ConfigService keeps values,
   versions and registrations as a snapshot on the broker; each ConfigWatcher has a durable watch
   queue of its own; commands are messages on the config service's queue, as a relay handler's
   ctx.publish(...) or `edarun config set` sends them.

Every figure comes from the runs: what each service holds after each step, the depth of the queues,
the registrations each config server has, the copies a watcher ignored, and how long each change
took to reach the services (from the moment the command left to the moment a service applied it).

    .venv/bin/python examples/watch_notification/run.py [--broker amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from runner.brokers import Broker, Message, connect_url
from runner.patterns.watch import ConfigService, ConfigWatcher, config_queue, state_queue, watch_queue
from runner.runtime.loop import run as run_loop
from runner.telemetry import Tracing

KEY, INITIAL = "max_order", 800
WEB, PHONE, MOBILE = "web-intake", "phone-intake", "mobile-intake"
SERVICES = (WEB, PHONE, MOBILE)
SETTLE_S = 5.0  # a step that has not settled by then is a failure of the demo, not a measurement
WIDTH = 100


def say(text: str) -> None:
    print(textwrap.indent(text, "     "), flush=True)


@dataclass
class Facts:
    """What one implementation measured while the script ran."""

    applied: list[tuple[str, Any, float]] = field(default_factory=list)  # service, value, perf_counter
    notes: dict[int, str] = field(default_factory=dict)  # step -> what happened, in a few words
    registrations: tuple[int, int] = (0, 0)  # registered before / after the config server restarted
    ignored: int | None = None  # copies a watcher ignored as not newer (None: no versions to tell)
    latencies: list[float] = field(default_factory=list)  # seconds, one per change that reached someone


# -- before: the talk's demo ------------------------------------------------------------------------


class TalkConfigServer:
    """The talk's config server: the value and the registry live in this object, nowhere else."""

    def __init__(self, network: dict[str, asyncio.Queue[Any]]) -> None:
        self.network = network
        self.value: Any = INITIAL  # a restart starts again from the initial value
        self.registry: dict[str, str] = {}  # service -> address

    def register(self, service: str, address: str) -> Any:
        self.registry[service] = address
        return self.value

    def set(self, value: Any) -> list[str]:
        self.value = value
        lost = []
        for service, address in list(self.registry.items()):
            say(f"Notifying {address}")
            inbox = self.network.get(address)
            if inbox is None:  # nobody listens on that port any more
                say("Service not found")
                del self.registry[service]
                lost.append(service)
            else:
                inbox.put_nowait(value)  # no version: the value is all a service gets
        return lost


class TalkDemo:
    """Services that listen on their own in-process queue while they run, and a TalkConfigServer."""

    label = "before: the talk's demo (registry in memory, notifications pushed to the services up)"

    def __init__(self) -> None:
        self.network: dict[str, asyncio.Queue[Any]] = {}  # address -> the queue a running service reads
        self.server: TalkConfigServer | None = None
        self.ports = itertools.count(62880)
        self.values: dict[str, Any] = {}
        self.addresses: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.facts = Facts()

    async def start_server(self) -> None:
        self.server = TalkConfigServer(self.network)

    async def stop_server(self) -> None:
        self.server = None

    async def start(self, service: str) -> None:
        assert self.server is not None, "the talk's service cannot start without its config server"
        address = f"{service}:{next(self.ports)}/watch_q"
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.network[address] = inbox
        self.addresses[service] = address
        self.values[service] = self.server.register(service, address)
        say(f"{service}: Config value = {self.values[service]}")
        self.tasks[service] = asyncio.create_task(self._listen(service, inbox))

    async def _listen(self, service: str, inbox: asyncio.Queue[Any]) -> None:
        while True:
            value = await inbox.get()
            self.values[service] = value
            self.facts.applied.append((service, value, time.perf_counter()))
            say(f"{service}: New Config Value Received: {value}")
            inbox.task_done()

    async def stop(self, service: str) -> None:
        # The service's queue lived in its embedded, non-persistent broker: it goes with the service.
        self.network.pop(self.addresses.pop(service))
        task = self.tasks.pop(service)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def set(self, value: Any) -> str:
        if self.server is None:
            return "refused: the config server is down"
        lost = self.server.set(value)
        return f"{', '.join(lost)} not found: unregistered" if lost else ""

    async def settle(self) -> None:
        inboxes = [self.network[address] for address in self.addresses.values()]
        await asyncio.wait_for(asyncio.gather(*(inbox.join() for inbox in inboxes)), SETTLE_S)

    def registered(self) -> int:
        return 0 if self.server is None else len(self.server.registry)

    def server_value(self) -> str:
        return "down" if self.server is None else str(self.server.value)

    def held(self, service: str) -> str:
        return str(self.values[service]) if service in self.tasks else "down" if service in self.values else "-"

    async def close(self) -> None:
        for service in list(self.tasks):
            await self.stop(service)


# -- after: edarun's watch path ---------------------------------------------------------------------


class CountingWatcher(ConfigWatcher):
    """A ConfigWatcher that also counts the notifications it set aside as not newer."""

    ignored = 0

    def apply(self, payload: dict[str, Any]) -> None:
        version = payload.get("versions", {}).get(KEY)
        if version is not None and version <= self.versions.get(KEY, -1):
            self.ignored += 1
        super().apply(payload)


class WatchPath:
    """edarun's ConfigService and one ConfigWatcher per running service, on one broker."""

    label = "after: edarun's watch path (snapshot on the broker, a durable watch queue per service)"

    def __init__(self, broker: Broker, suffix: str) -> None:
        self.broker = broker
        self.suffix = suffix  # on RabbitMQ the names of one run, so that runs do not meet
        self.pipeline = f"watch-demo{suffix}"
        self.tracing = Tracing()  # disabled: the demo measures, it does not trace
        self.server: ConfigService | None = None
        self.watchers: dict[str, CountingWatcher] = {}
        self.started: set[str] = set()
        self.ignored = 0
        self.facts = Facts()

    def name(self, service: str) -> str:
        return service + self.suffix

    async def start_server(self) -> None:
        self.server = ConfigService(self.pipeline, {KEY: INITIAL}, broker=self.broker, tracing=self.tracing)
        await self.server.start()

    async def stop_server(self) -> None:
        assert self.server is not None
        await self.server.stop()  # the snapshot it held goes back to its queue for the next start
        self.server = None

    async def start(self, service: str) -> None:
        def changed(key: str, value: Any, version: int) -> None:
            self.facts.applied.append((service, value, time.perf_counter()))
            if service in self.started:
                say(f"{service}: New Config Value Received: {value} (version {version})")
            else:
                say(f"{service}: Config value = {value} (version {version})")
                self.started.add(service)

        watcher = CountingWatcher(
            self.pipeline, self.name(service), [KEY], {KEY: INITIAL}, broker=self.broker,
            tracing=self.tracing, changed=changed,
        )  # fmt: skip
        self.watchers[service] = watcher
        await watcher.start(timeout=1.0)

    async def stop(self, service: str) -> None:
        watcher = self.watchers.pop(service)
        self.ignored += watcher.ignored
        self.started.discard(service)
        await watcher.close()  # its watch queue stays, durable, and keeps what arrives for it

    async def set(self, value: Any) -> str:
        # The command a relay handler publishes with ctx.publish, or `edarun config set` sends.
        command = orjson.dumps({"op": "set", "key": KEY, "value": value})
        await self.broker.publish(config_queue(self.pipeline), Message(command, os.urandom(8).hex()))
        if self.server is None:
            waiting = (await self.broker.depth(config_queue(self.pipeline))).ready
            return f"queued: {waiting} command on {config_queue(self.pipeline)}"
        return ""

    async def waiting_for(self, service: str) -> int:
        """Notifications in a service's watch queue, not yet taken."""
        return (await self.broker.depth(watch_queue(self.name(service)))).ready

    async def settle(self) -> None:
        queues = [watch_queue(self.name(s)) for s in self.watchers]
        if self.server is not None:
            queues.append(config_queue(self.pipeline))
        async with asyncio.timeout(SETTLE_S):
            while any([(await self.broker.depth(q)).total for q in queues]):
                await asyncio.sleep(0.001)

    def registered(self) -> int:
        return 0 if self.server is None else len(self.server.state.watchers)

    def server_value(self) -> str:
        if self.server is None:
            return "down"
        return f"{self.server.state.values[KEY]} v{self.server.state.versions[KEY]}"

    def held(self, service: str) -> str:
        watcher = self.watchers.get(service)
        if watcher is None:
            return "down" if service in self.facts_services() else "-"
        return f"{watcher.config[KEY]} v{watcher.versions[KEY]}"

    def facts_services(self) -> set[str]:
        return {service for service, _, _ in self.facts.applied}

    async def close(self) -> None:
        for service in list(self.watchers):
            await self.stop(service)
        if self.server is not None:
            await self.stop_server()
        self.facts.ignored = self.ignored

    def queues(self) -> list[str]:
        """What this run declared on the broker (removed after a run on RabbitMQ)."""
        return [config_queue(self.pipeline), state_queue(self.pipeline),
                *(watch_queue(self.name(s)) for s in SERVICES)]  # fmt: skip


# -- the script --------------------------------------------------------------------------------------

Step = tuple[str, Callable[[Any], Any]]


def steps() -> list[tuple[str, Callable[[Any], Any], Any]]:
    """(what happens, the action, the value it sets or None)."""

    async def begin(world: Any) -> None:
        await world.start_server()
        await world.start(WEB)
        await world.start(PHONE)

    async def restart_server(world: Any) -> None:
        before = world.registered()
        await world.stop_server()
        await world.start_server()
        world.facts.registrations = (before, world.registered())

    return [
        (f"the config server starts ({KEY} = {INITIAL}); {WEB} and {PHONE} start", begin, None),
        (f"set {KEY} = 900", lambda w: w.set(900), 900),
        (f"{PHONE} stops", lambda w: w.stop(PHONE), None),
        (f"set {KEY} = 1100 while {PHONE} is down", lambda w: w.set(1100), 1100),
        (f"{PHONE} starts again", lambda w: w.start(PHONE), None),
        ("the config server stops", lambda w: w.stop_server(), None),
        (f"set {KEY} = 1200 while it is down", lambda w: w.set(1200), 1200),
        ("the config server starts again", restart_server, None),
        (f"{MOBILE} starts", lambda w: w.start(MOBILE), None),
        (f"set {KEY} = 750", lambda w: w.set(750), 750),
    ]


async def play(world: TalkDemo | WatchPath) -> list[list[str]]:
    """Run the script; one row per step: the step, the server's value, each service's, a note."""
    print(f"\n== {world.label}")
    rows = []
    for number, (what, action, value) in enumerate(steps(), start=1):
        print(f"  {number:>2}. {what}")
        sent = time.perf_counter()
        note = await action(world)
        await world.settle()
        arrived = [t for _, v, t in world.facts.applied if v == value and t >= sent]
        if value is not None and arrived:
            world.facts.latencies.append(max(arrived) - sent)
        if isinstance(world, WatchPath) and number == 4:
            note = f"{world.waiting_for(PHONE) and await world.waiting_for(PHONE)} waiting in {watch_queue(PHONE)}"
        rows.append([str(number), world.server_value(), *(world.held(s) for s in SERVICES), note or ""])
        if note:
            world.facts.notes[number] = note
            say(f"({note})")
    await world.close()
    return rows
