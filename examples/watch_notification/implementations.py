"""The two implementations the watch notification demo (run.py) plays its script against.

`TalkDemo` is the talk's demo, compact and faithful: a config server whose value and registry live
in its memory, and services that listen on a queue inside them while they run, so a value pushed to
a service that is down is lost. `WatchPath` is edarun's watch path (runner.patterns.watch): a
ConfigService whose snapshot is on the broker and a ConfigWatcher per service with a durable watch
queue. Both offer the same steps (start/stop the server or a service, set a value, settle) and
record what they measured in a `Measured`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from runner.brokers import Broker, Message
from runner.patterns.watch import ConfigService, ConfigWatcher, config_queue, state_queue, watch_queue
from runner.telemetry import Tracing

KEY, INITIAL = "max_order", 800
WEB, PHONE, MOBILE = "web-intake", "phone-intake", "mobile-intake"
SERVICES = (WEB, PHONE, MOBILE)
SETTLE_S = 5.0  # a step that has not settled by then is a failure of the demo, not a measurement


def say(text: str) -> None:
    print(f"        {text}", flush=True)


@dataclass
class Measured:
    """What one implementation showed while the script ran."""

    applied: list[tuple[str, Any, float]] = field(default_factory=list)  # service, value, perf_counter
    registered: list[int] = field(default_factory=list)  # registrations the server held after each step
    notes: list[str] = field(default_factory=list)  # after each step: what happened, in a few words
    rows: list[list[str]] = field(default_factory=list)  # after each step: server, each service
    latencies: list[float] = field(default_factory=list)  # seconds: sent -> applied by the last service
    ignored: int | None = None  # copies set aside as not newer (None: no versions to tell by)


# -- before: the talk's demo --------------------------------------------------------------------


class TalkConfigServer:
    """The talk's config server: the value and the registry live in this object and nowhere else."""

    def __init__(self, network: dict[str, asyncio.Queue[Any]]) -> None:
        self.network = network
        self.value: Any = INITIAL  # after a restart: the initial value again
        self.registry: dict[str, str] = {}  # service -> address

    def register(self, service: str, address: str) -> Any:
        self.registry[service] = address
        return self.value

    def set(self, value: Any) -> list[str]:
        """Push `value` to every registered address; returns the services it unregistered."""
        self.value = value
        lost = []
        for service, address in list(self.registry.items()):
            say(f"Notifying {address}")
            inbox = self.network.get(address)
            if inbox is None:  # nobody listens on that port now
                say("Service not found")
                del self.registry[service]
                lost.append(service)
            else:
                inbox.put_nowait(value)  # no version: the value is all a service gets
        return lost


class TalkDemo:
    """A TalkConfigServer and services that each read a queue of their own while they run."""

    label = "before: the talk's demo (a registry in memory, values pushed to the services that are up)"

    def __init__(self) -> None:
        self.network: dict[str, asyncio.Queue[Any]] = {}  # address -> the queue a running service reads
        self.server: TalkConfigServer | None = None
        self.ports = itertools.count(62880)
        self.values: dict[str, Any] = {}  # service -> the value it holds (or held when it stopped)
        self.addresses: dict[str, str] = {}  # running service -> its address
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.measured = Measured()

    async def start_server(self) -> str:
        self.server = TalkConfigServer(self.network)
        return ""

    async def stop_server(self) -> str:
        self.server = None
        return ""

    async def start(self, service: str) -> str:
        assert self.server is not None, "the talk's service cannot start without its config server"
        address = f"{service}:{next(self.ports)}/watch_q"
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.network[address] = inbox
        self.addresses[service] = address
        self.values[service] = self.server.register(service, address)
        say(f"{service}: Config value = {self.values[service]}")
        self.tasks[service] = asyncio.create_task(self._listen(service, inbox))
        return ""

    async def _listen(self, service: str, inbox: asyncio.Queue[Any]) -> None:
        while True:
            value = await inbox.get()
            self.values[service] = value
            self.measured.applied.append((service, value, time.perf_counter()))
            say(f"{service}: New Config Value Received: {value}")
            inbox.task_done()

    async def stop(self, service: str) -> str:
        # Its queue lived in the service's embedded, non-persistent broker: it goes with the service.
        del self.network[self.addresses.pop(service)]
        task = self.tasks.pop(service)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return ""

    async def set(self, value: Any) -> str:
        if self.server is None:
            return "refused: config server down"
        lost = self.server.set(value)
        return f"{', '.join(lost)} unregistered" if lost else ""

    async def settle(self) -> str:
        inboxes = [self.network[address] for address in self.addresses.values()]
        await asyncio.wait_for(asyncio.gather(*(inbox.join() for inbox in inboxes)), SETTLE_S)
        return ""  # nothing is kept anywhere for a service that is down

    def registered(self) -> int:
        return 0 if self.server is None else len(self.server.registry)

    def row(self) -> list[str]:
        server = "down" if self.server is None else str(self.server.value)
        held = [
            str(self.values[s]) if s in self.tasks else "down" if s in self.values else "-" for s in SERVICES
        ]
        return [server, *held]

    async def close(self) -> None:
        for service in list(self.tasks):
            await self.stop(service)


# -- after: edarun's watch path ---------------------------------------------------------------------


class CountingWatcher(ConfigWatcher):
    """A ConfigWatcher that also counts the notifications it set aside as not newer than its value."""

    ignored = 0

    def apply(self, payload: dict[str, Any]) -> None:
        version = payload.get("versions", {}).get(KEY)
        if version is not None and version <= self.versions.get(KEY, -1):
            self.ignored += 1
        super().apply(payload)


class WatchPath:
    """edarun's ConfigService and a ConfigWatcher for each running service, on one broker."""

    label = "after: edarun's watch path (a snapshot on the broker, a durable watch queue per service)"

    def __init__(self, broker: Broker, suffix: str) -> None:
        self.broker = broker
        self.suffix = suffix  # on RabbitMQ: this run's names, so that two runs never share a queue
        self.pipeline = f"watch-demo{suffix}"
        self.tracing = Tracing()  # disabled: the demo measures, it does not trace
        self.server: ConfigService | None = None
        self.watchers: dict[str, CountingWatcher] = {}
        self.known: dict[str, str] = {}  # service -> the value it held, with its version
        self.ignored = 0  # by watchers that stopped since
        self.measured = Measured()

    def queues(self) -> list[str]:
        """Every queue this run declares on the broker."""
        return [config_queue(self.pipeline), state_queue(self.pipeline),
                *(watch_queue(self.pipeline, s + self.suffix) for s in SERVICES)]  # fmt: skip

    async def start_server(self) -> str:
        self.server = ConfigService(self.pipeline, {KEY: INITIAL}, broker=self.broker, tracing=self.tracing)
        await self.server.start()
        return ""

    async def stop_server(self) -> str:
        assert self.server is not None
        await self.server.stop()  # the snapshot it held goes back to its queue, for the next start
        self.server = None
        return ""

    async def start(self, service: str) -> str:
        first = True

        def changed(key: str, value: Any, version: int) -> None:
            nonlocal first
            self.measured.applied.append((service, value, time.perf_counter()))
            self.known[service] = f"{value} v{version}"
            what = "Config value =" if first else "New Config Value Received:"
            say(f"{service}: {what} {value} (version {version})")
            first = False

        watcher = CountingWatcher(
            self.pipeline, service + self.suffix, [KEY], {KEY: INITIAL}, broker=self.broker,
            tracing=self.tracing, changed=changed,
        )  # fmt: skip
        self.watchers[service] = watcher
        await watcher.start(timeout=SETTLE_S)
        return ""

    async def stop(self, service: str) -> str:
        watcher = self.watchers.pop(service)
        self.ignored += watcher.ignored
        await watcher.close()  # its durable watch queue stays and keeps what arrives for it
        return ""

    async def set(self, value: Any) -> str:
        # The command a relay handler publishes with ctx.publish(...), or `edarun config set` sends.
        command = orjson.dumps({"op": "set", "key": KEY, "value": value})
        await self.broker.publish(config_queue(self.pipeline), Message(command, os.urandom(8).hex()))
        return ""

    async def settle(self) -> str:
        """Wait until the config service (when up) and every running watcher have taken all there is;
        then say what waits on the broker for those that are down."""
        busy = [watch_queue(self.pipeline, s + self.suffix) for s in self.watchers]
        if self.server is not None:
            busy.append(config_queue(self.pipeline))
        async with asyncio.timeout(SETTLE_S):
            while any([(await self.broker.depth(queue)).total for queue in busy]):  # noqa: ASYNC110
                await asyncio.sleep(0.001)  # the broker's counts: polled, there is no event to wait on
        waiting = []
        if self.server is None:
            queued = (await self.broker.depth(config_queue(self.pipeline))).ready
            waiting += [f"{queued} queued on {config_queue(self.pipeline)}"] if queued else []
        for service in SERVICES:
            if service in self.known and service not in self.watchers:
                queue = watch_queue(self.pipeline, service + self.suffix)
                count = (await self.broker.depth(queue)).ready
                waiting += [f"{count} waiting in {queue}"] if count else []
        ignored = self.ignored + sum(w.ignored for w in self.watchers.values())
        if ignored > (self.measured.ignored or 0):
            waiting.append(f"{ignored - (self.measured.ignored or 0)} copy set aside as not newer")
            self.measured.ignored = ignored
        return "; ".join(waiting)

    def registered(self) -> int:
        return 0 if self.server is None else len(self.server.state.watchers)

    def row(self) -> list[str]:
        state = None if self.server is None else self.server.state
        server = "down" if state is None else f"{state.values[KEY]} v{state.versions[KEY]}"
        held = [self.known[s] if s in self.watchers else "down" if s in self.known else "-" for s in SERVICES]
        return [server, *held]

    async def close(self) -> None:
        for service in list(self.watchers):
            await self.stop(service)
        if self.server is not None:
            await self.stop_server()
        self.measured.ignored = self.ignored
