"""Watch notification (pattern 4): top-level `config:` values, consumer `watch: [key, …]`.

Everything travels as messages; no service keeps a connection to another:

- The config service (`<pipeline>.config`, a service of its own) owns the values and the
  registrations. It takes commands from its durable queue `<pipeline>.config`: `set` a value,
  `register` a watch queue for some keys, `get` values (answered on the fanout exchange
  `<pipeline>.config.replies`). Its state (values, their version numbers, the registrations) is one
  snapshot message on `<pipeline>.config.state`, which it holds unacknowledged while it runs: if it
  dies, the broker has the snapshot back for its next start. A new snapshot is confirmed before the
  old one is acknowledged, so the queue never lacks one.
- A change gets the next version number and is published to every watch queue registered for its
  key, one change after the other. A service that is down finds the changes in its queue when it is
  back. A watch queue that no longer exists is unregistered (the talk's "Service not found").
- A watching service (`ConfigWatcher`) has a durable watch queue of its own,
  `<pipeline>.<service>.watch`. On
  start it registers (a message) and waits for the current values before it consumes anything; then
  it applies each change whose version is newer than the one it has, so a duplicate or a late copy
  changes nothing. Re-registering (every start does) brings the current values again.

`edarun up --reload` delivers edited policies the same way, as the reserved key `edarun.policy`
(runtime.reload). `edarun config PIPELINE set|get` is a `ConfigClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from ..brokers import Broker, BrokerError, Delivery, Message, Subscription
from ..telemetry import Tracing

log = logging.getLogger("edarun.config")

POLICY_KEY = "edarun.policy"  # reserved: the pipeline's live policies (edarun up --reload)
RESERVED_PREFIX = "edarun."
STATE_SUFFIX = ".state"
REPLIES_SUFFIX = ".replies"
REGISTER_TIMEOUT = 10.0  # how long a starting service waits for the current values
# A watch queue unused this long (its service gone: removed, renamed, fewer instances) is deleted
# by the broker, and the config service then unregisters it. A service that comes back later
# loses nothing: it declares its queue again and registering brings the current values.
WATCH_QUEUE_EXPIRES_S = 7 * 24 * 3600.0
STALE_GET_S = 30.0  # a `get` queued while no config service ran: nobody waits for its answer now


def config_service_name(pipeline: str) -> str:
    """The config service's name, which is also its command queue's."""
    return f"{pipeline}.config"


def config_queue(pipeline: str) -> str:
    return config_service_name(pipeline)


def state_queue(pipeline: str) -> str:
    return config_queue(pipeline) + STATE_SUFFIX


def replies_exchange(pipeline: str) -> str:
    return config_queue(pipeline) + REPLIES_SUFFIX


def watch_queue(pipeline: str, service: str, instance: int = 1) -> str:
    """A service's own watch queue; each instance of a consumer has one (each must hear every
    change). The pipeline is in the name: two pipelines on one broker may have a service of the
    same name, and each must hear only its own changes."""
    name = f"{pipeline}.{service}.watch"
    return name if instance == 1 else f"{name}.{instance}"


def _message(payload: dict[str, Any], pipeline: str) -> Message:
    # Pinned: on several brokers (pattern 9) a pipeline's config traffic stays on one, so a change
    # never overtakes an earlier one on its way to a watch queue.
    return Message(orjson.dumps(payload), os.urandom(8).hex(), pin=config_queue(pipeline).encode())


@dataclass
class ConfigState:
    """What the config service keeps: values, the version of each, and who watches what."""

    version: int = 0  # the version of the latest change
    values: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    watchers: dict[str, dict[str, Any]] = field(default_factory=dict)  # queue → {service, keys}
    saved: int = 0  # snapshots written so far: the newest wins (a registration changes no version)
    # Names this line of versions: a state that was lost and begun again counts from 0 under a new
    # epoch, and watchers start over instead of ignoring "older" versions.
    epoch: str = field(default_factory=lambda: os.urandom(6).hex())

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "values": self.values,
                "versions": self.versions,
                "watchers": self.watchers,
                "saved": self.saved,
                "epoch": self.epoch,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> ConfigState | None:
        try:
            data = orjson.loads(body)
            return cls(
                int(data["version"]),
                dict(data["values"]),
                dict(data["versions"]),
                dict(data["watchers"]),
                int(data.get("saved", 0)),
                str(data.get("epoch", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def change(self, key: str, value: Any) -> int:
        self.version += 1
        self.values[key] = value
        self.versions[key] = self.version
        return self.version

    def of(self, keys: list[str] | None) -> dict[str, Any]:
        """`{"values": …, "versions": …}` for `keys` (all when None) that have a value."""
        chosen = list(self.values) if keys is None else [k for k in keys if k in self.values]
        return {
            "values": {k: self.values[k] for k in chosen},
            "versions": {k: self.versions[k] for k in chosen},
            "epoch": self.epoch,
        }


class ConfigService:
    """Pattern 4's config server: one per pipeline, commands in, notifications out."""

    def __init__(
        self,
        pipeline: str,
        initial: Mapping[str, Any],
        *,
        broker: Broker,
        tracing: Tracing,
        policy: Any = None,
    ) -> None:
        self.pipeline = pipeline
        self.name = config_service_name(pipeline)
        self.initial = dict(initial)
        # The policies of the file this run was started with (--reload): they replace whatever an
        # earlier run left, or a service would be told an old file's policies when it registers.
        self.policy = policy
        self.broker = broker
        self.tracing = tracing
        self.state = ConfigState()
        self._held: Delivery | None = None  # the snapshot this service stands on
        self._last_saved: str | None = None  # the message id of the snapshot it wrote last
        self._snapshots: Subscription | None = None
        self._commands: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        broker = self.broker
        await broker.declare(config_queue(self.pipeline))
        await broker.declare(state_queue(self.pipeline))
        await self._load()
        self._tasks.append(asyncio.create_task(self._follow_snapshots(), name=f"{self.name} state"))
        self._commands = await broker.consume(config_queue(self.pipeline), prefetch=16)
        self._tasks.append(asyncio.create_task(self._serve(), name=self.name))

    async def _load(self) -> None:
        """Take the latest snapshot the queue has (several after a crash mid-change), merge in the
        file's values for keys it does not know, and stand on it."""
        queue = state_queue(self.pipeline)
        depth = await self.broker.depth(queue)
        while not depth.complete:
            # A broker that may hold the latest snapshot does not answer (pattern 9): starting from
            # what the others have would roll the values back, or begin them again.
            log.warning("%s: waiting for every broker to read the stored config state", self.name)
            await asyncio.sleep(1.0)
            depth = await self.broker.depth(queue)
        ready = depth.ready
        self._snapshots = sub = await self.broker.consume(queue, prefetch=ready + 16)
        found: list[tuple[ConfigState, Delivery]] = []
        with contextlib.suppress(TimeoutError, StopAsyncIteration):
            async with asyncio.timeout(5.0):
                while len(found) < ready:
                    delivery = await anext(sub)
                    state = ConfigState.decode(delivery.body)
                    if state is None:
                        log.error("%s: a snapshot that does not decode was dropped", self.name)
                        await delivery.ack()
                        continue
                    found.append((state, delivery))
        changed = not found
        if found:
            found.sort(key=lambda item: item[0].saved)
            for _, stale in found[:-1]:
                await stale.ack()
            self.state, self._held = found[-1]
        for key, value in self.initial.items():
            # The file's value, unless a change (`edarun config set`, a handler) replaced it.
            if self.state.versions.get(key, 0) == 0 and (
                key not in self.state.values or self.state.values[key] != value
            ):
                self.state.values[key] = value
                self.state.versions[key] = 0  # older than any change
                changed = True
        if self.policy is not None and self.state.values.get(POLICY_KEY) != self.policy:
            self.state.change(POLICY_KEY, self.policy)
            changed = True
        if changed:
            await self._persist()
        log.info(
            "%s: %d values, %d watch queues registered (version %d)",
            self.name, len(self.state.values), len(self.state.watchers), self.state.version,
        )  # fmt: skip

    async def _persist(self, state: ConfigState | None = None) -> None:
        """Publish `state` (the current one by default; confirmed), then make it current. The
        snapshot it replaces is acknowledged when this one arrives back (`_follow_snapshots`)."""
        state = self.state if state is None else state
        state.saved += 1
        message_id = f"{self.name}-{state.saved}-{os.urandom(4).hex()}"
        message = Message(state.encode(), message_id, pin=config_queue(self.pipeline).encode())
        try:
            await self.broker.publish(state_queue(self.pipeline), message)
        except BrokerError:
            state.saved -= 1
            raise
        self.state, self._last_saved = state, message_id

    async def _follow_snapshots(self) -> None:
        """Stand on the snapshot this service wrote last; any other one that arrives (an older one
        of its own, or one a broker held while it was down) is not the state, and goes."""
        assert self._snapshots is not None
        async for delivery in self._snapshots:
            if delivery.message_id == self._last_saved:
                previous, self._held = self._held, delivery
                if previous is not None:
                    await previous.ack()
                continue
            if not delivery.message_id.startswith(f"{self.name}-"):
                log.debug("%s: a snapshot that is not this service's was dropped", self.name)
            elif ConfigState.decode(delivery.body) is not None:
                log.info("%s: an earlier snapshot came back late and was dropped", self.name)
            await delivery.ack()

    async def _serve(self) -> None:
        assert self._commands is not None
        async for delivery in self._commands:
            try:
                command = orjson.loads(delivery.body)
                op = command["op"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("%s: not a config command, ignored: %.200r", self.name, delivery.body)
                await delivery.ack()
                continue
            try:
                await self.handle(op, command)
            except BrokerError as exc:
                # The state could not be saved (nothing of the command is applied): it stays in its
                # queue and is tried again.
                log.warning("%s: %s not applied yet (%s); trying again", self.name, op, exc)
                await delivery.nack(requeue=True)
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:  # a command of the wrong shape: said, and the service goes on
                log.error("%s: bad %s command ignored (%s): %.200r", self.name, op, exc, delivery.body)
            await delivery.ack()

    async def handle(self, op: str, command: dict[str, Any]) -> None:
        state = self.state
        if op == "set":
            # One key, or several at once (an edit under --reload): saved and sent as one change.
            values = command["values"] if "values" in command else {command["key"]: command["value"]}
            if not isinstance(values, dict) or not values:
                raise ValueError("'values' must be a mapping of keys to values")
            keys = [str(k) for k in values]
            state = copy.deepcopy(self.state)  # current only once it is saved
            changed = [
                (key, value, state.change(key, value))
                for key, value in zip(keys, values.values(), strict=True)
            ]
            await self._persist(state)
            for key, value, version in changed:
                self.tracing.decision(
                    f"config set {key}", {"edarun.config.key": key, "edarun.config.version": version}
                )
                if key != POLICY_KEY:
                    log.info("%s: %s = %s (version %d)", self.name, key, _short(value), version)
            for queue, registration in list(state.watchers.items()):
                concerned = [k for k in keys if k in registration["keys"]]
                if concerned:
                    await self._notify(queue, state.of(concerned))
            await self._reply(command, state.of(keys))
        elif op == "register":
            queue, watched = str(command["queue"]), [str(k) for k in command["keys"]]
            # Declared here too: on several brokers (pattern 9) one that comes back gets it again
            # before a change is sent there.
            await self.broker.declare(queue, expires=WATCH_QUEUE_EXPIRES_S)
            state = copy.deepcopy(self.state)
            state.watchers[queue] = {"service": str(command.get("service", queue)), "keys": watched}
            await self._persist(state)
            await self._notify(queue, {**state.of(watched), "registered": command.get("request")})
        elif op == "get":
            if time.time() - float(command.get("at", 0)) > STALE_GET_S:
                return  # whoever asked stopped waiting long ago
            asked = command.get("keys")
            await self._reply(command, state.of(None if asked is None else [str(k) for k in asked]))
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _notify(self, queue: str, payload: dict[str, Any]) -> None:
        log.debug("%s: notifying %s", self.name, queue)
        try:
            await self.broker.publish(queue, _message(payload, self.pipeline))
        except BrokerError as exc:
            if "does not exist" not in str(exc):
                # The change is saved; this service hears it when it registers again (each start).
                log.warning("%s: %s not notified (%s)", self.name, queue, exc)
                return
            # The watching service and its queue are gone for good: stop telling it.
            log.warning("%s: watch queue %s not found; unregistered", self.name, queue)
            state = copy.deepcopy(self.state)
            state.watchers.pop(queue, None)
            with contextlib.suppress(BrokerError):  # saved with the next change otherwise
                await self._persist(state)

    async def _reply(self, command: dict[str, Any], payload: dict[str, Any]) -> None:
        request = command.get("request")
        if request is not None:
            reply = {**payload, "request": request, "version": self.state.version}
            await self.broker.broadcast(replies_exchange(self.pipeline), _message(reply, self.pipeline))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in (self._commands, self._snapshots):
            if sub is not None:
                await sub.close()  # the held snapshot goes back to its queue for the next start


class ConfigWatcher:
    """One service's view of the values it watches, kept current through its watch queue."""

    def __init__(
        self,
        pipeline: str,
        service: str,
        keys: list[str],
        initial: Mapping[str, Any],
        *,
        broker: Broker,
        tracing: Tracing,
        instance: int = 1,
        changed: Callable[[str, Any, int], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.service = service
        self.keys = list(dict.fromkeys(keys))
        self.queue = watch_queue(pipeline, service, instance)
        self.broker = broker
        self.tracing = tracing
        self.changed = changed  # (key, value, version), after the value is in place
        # What handlers see as ctx.config: the watched keys (the reserved policy key is not one).
        self.values: dict[str, Any] = {k: initial.get(k) for k in self.keys if k != POLICY_KEY}
        self.config: Mapping[str, Any] = MappingProxyType(self.values)
        self.policy: Any = None
        self.versions: dict[str, int] = {}
        self.epoch: str | None = None
        self._request = os.urandom(8).hex()
        self._answered = asyncio.Event()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = REGISTER_TIMEOUT) -> None:
        """Register and wait (at most `timeout`) for the current values."""
        broker = self.broker
        await broker.declare(self.queue, expires=WATCH_QUEUE_EXPIRES_S)
        await broker.declare(config_queue(self.pipeline))
        self._sub = await broker.consume(self.queue, prefetch=100)
        self._task = asyncio.create_task(self._follow(), name=f"{self.service} watch")
        register = {
            "op": "register", "queue": self.queue, "keys": self.keys, "service": self.service,
            "request": self._request,
        }  # fmt: skip
        await broker.publish(config_queue(self.pipeline), _message(register, self.pipeline))
        try:
            await asyncio.wait_for(self._answered.wait(), timeout)
        except TimeoutError:
            log.warning(
                "%s: no answer from the config service within %.0fs; starting with the file's values "
                "(the current ones follow when it answers)", self.service, timeout,
            )  # fmt: skip

    async def _follow(self) -> None:
        assert self._sub is not None
        async for delivery in self._sub:
            try:
                self.apply(orjson.loads(delivery.body))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.error(
                    "%s: not a config notification, ignored (%s): %.200r", self.service, exc, delivery.body
                )
            await delivery.ack()

    def apply(self, payload: dict[str, Any]) -> None:
        epoch = payload.get("epoch")
        if epoch is not None and epoch != self.epoch:
            if self.epoch is not None:
                log.warning("%s: the config service's state was begun again; versions restart", self.service)
            self.epoch, self.versions = epoch, {}
        versions = payload.get("versions", {})
        for key, value in payload["values"].items():
            version = int(versions.get(key, 0))
            if key not in self.keys or version <= self.versions.get(key, -1):
                continue  # not watched here, or not newer than what this service has
            self.versions[key] = version
            if key == POLICY_KEY:
                self.policy = value
            else:
                self.values[key] = value
                log.info("%s: config %s = %s (version %d)", self.service, key, _short(value), version)
                self.tracing.decision(
                    f"config {key}",
                    {
                        "edarun.config.key": key,
                        "edarun.config.version": version,
                        "edarun.service": self.service,
                    },
                )
            if self.changed is not None:
                try:
                    self.changed(key, value, version)
                except Exception:  # a bad policy must not stop the notifications that follow
                    log.exception("%s: applying %s version %d failed", self.service, key, version)
        if payload.get("registered") == self._request:
            self._answered.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._sub is not None:
            await self._sub.close()


class ConfigClient:
    """`edarun config set|get`: commands to the config service, answers on the replies exchange."""

    def __init__(self, pipeline: str, broker: Broker) -> None:
        self.pipeline = pipeline
        self.broker = broker

    async def send(self, command: dict[str, Any]) -> None:
        """Queue `command` for the config service (pinned with the rest of its traffic), without
        waiting for an answer."""
        await self.broker.publish(config_queue(self.pipeline), _message(command, self.pipeline))

    async def request(self, command: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Send `command` and wait for the config service's answer; None when none came in time
        (the command stays queued for the service's next start)."""
        broker = self.broker
        request = os.urandom(8).hex()
        replies = await broker.listen(replies_exchange(self.pipeline))
        try:
            await broker.declare(config_queue(self.pipeline))
            await self.send({**command, "request": request, "at": time.time()})
            async with asyncio.timeout(timeout):
                async for delivery in replies:
                    await delivery.ack()
                    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                        answer = orjson.loads(delivery.body)
                        if answer.get("request") == request:
                            return dict(answer)
        except TimeoutError:
            return None
        finally:
            await replies.close()
        return None

    async def stored(self) -> ConfigState | None:
        """The snapshot on the broker, read without a config service (which would be holding it)."""
        queue = state_queue(self.pipeline)
        await self.broker.declare(queue)
        ready = (await self.broker.depth(queue)).ready
        if not ready:
            return None
        sub = await self.broker.consume(queue, prefetch=ready)
        best: ConfigState | None = None
        try:
            with contextlib.suppress(TimeoutError, StopAsyncIteration):
                async with asyncio.timeout(5.0):
                    for _ in range(ready):
                        state = ConfigState.decode((await anext(sub)).body)
                        if state is not None and (best is None or state.saved > best.saved):
                            best = state
        finally:
            await sub.close()  # every snapshot goes back, untouched
        return best


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."
