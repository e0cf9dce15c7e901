"""Watch notification: values reach every watching service in order, also one that was down, with
no connection to the config service between changes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runner.brokers import Broker, Message, connect_url
from runner.patterns.watch import (
    POLICY_KEY,
    ConfigClient,
    ConfigService,
    ConfigState,
    ConfigWatcher,
    config_queue,
    replies_exchange,
    state_queue,
    watch_queue,
)
from runner.telemetry import Tracing

HANDLERS = """
import time

SEEN = []  # (consumer, limit) per call, in call order


def ticks():
    for i in range(80):
        yield {"id": i}


def changes():
    for value in (2, 3, 4, 5, 6):
        yield {"key": "limit", "value": value}


def relay(event, ctx):
    ctx.publish(CONFIG_QUEUE, {"op": "set", "key": "limit", "value": event["value"]})


def look(event, ctx):
    SEEN.append((ctx.consumer, ctx.config["limit"]))
    time.sleep(0.002)
"""


def unique(stem: str) -> str:
    return f"{stem}-{os.getpid()}-{os.urandom(3).hex()}"


async def cleanup(broker_url: str, names: list[str]) -> None:
    if broker_url != "memory":
        from conftest import delete_queues

        await delete_queues(names)


async def test_two_watchers_get_every_change_in_order(
    factory: Any, run_pipeline: Any, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique("watch")
    mod = factory.module("watch_two", HANDLERS.replace("CONFIG_QUEUE", repr(config_queue(name))))
    path = factory.pipeline(
        f"""
        version: 1
        name: {name}
        plugins: [plugins]
        config:
          limit: 1
        producers:
          ticks-a: {{source: "{mod}:ticks", rate: 40/s, to: {name}-a}}
          ticks-b: {{source: "{mod}:ticks", rate: 40/s, to: {name}-b}}
          admin: {{source: "{mod}:changes", to: {name}-admin}}
        consumers:
          relay: {{from: {name}-admin, handler: "{mod}:relay"}}
          a: {{from: {name}-a, handler: "{mod}:look", watch: [limit]}}
          b: {{from: {name}-b, handler: "{mod}:look", watch: [limit]}}
        """
    )
    caplog.set_level(logging.INFO, logger="edarun.config")
    try:
        code, runner = await run_pipeline(path)
    finally:
        queues = [config_queue(name), state_queue(name), watch_queue(name, "a"), watch_queue(name, "b")]
        await cleanup(broker_url, queues)
    assert code == 0
    seen = factory.imported(mod).SEEN
    for consumer in ("a", "b"):
        applied = [
            (int(m.group(1)), int(m.group(2)))
            for record in caplog.records
            if (m := re.match(rf"{consumer}: config limit = (\d+) \(version (\d+)\)", record.getMessage()))
        ]
        # Every change, each once, in the order it was sent (1 is the file's value), though the
        # relay sent them back to back.
        assert applied == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)], applied
        values = [v for c, v in seen if c == consumer]
        assert values[0] == 1  # the file's value before any change: there before the first event
        assert values == sorted(values)  # a handler never sees an older value after a newer one
        assert values[-1] == 6
    assert runner.stats.consumers["a"].processed == runner.stats.consumers["b"].processed == 80


@pytest.fixture
async def bus(broker_url: str) -> AsyncIterator[Broker]:
    broker = connect_url(broker_url)
    await broker.connect(10.0)
    yield broker
    await broker.close()


async def settled(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state changed by another task, polled
            await asyncio.sleep(0.02)


async def test_a_service_that_was_down_gets_the_change_when_back(bus: Broker, broker_url: str) -> None:
    name = unique("down")
    tracing = Tracing()

    def service() -> ConfigService:
        return ConfigService(name, {"limit": 1}, broker=bus, tracing=tracing)

    def watcher(who: str) -> ConfigWatcher:
        return ConfigWatcher(name, who, ["limit"], {"limit": 1}, broker=bus, tracing=tracing)

    config = service()
    await config.start()
    a, b = watcher("a"), watcher("b")
    try:
        await a.start(timeout=5.0)
        await b.start(timeout=5.0)
        assert a.config["limit"] == b.config["limit"] == 1
        client = ConfigClient(name, bus)
        answer = await client.request({"op": "set", "key": "limit", "value": 2}, timeout=5.0)
        assert answer is not None and answer["versions"]["limit"] == 1
        await settled(lambda: a.config["limit"] == 2 and b.config["limit"] == 2)

        await b.close()  # b goes down
        await client.request({"op": "set", "key": "limit", "value": 3}, timeout=5.0)
        await settled(lambda: a.config["limit"] == 3)
        # b's change waits in b's own durable queue.
        async with asyncio.timeout(5.0):
            while (await bus.depth(watch_queue(name, "b"))).ready != 1:  # noqa: ASYNC110 - the broker's count
                await asyncio.sleep(0.02)

        # The config service goes down too: b comes back with no one to talk to but its queue.
        await config.stop()
        b = watcher("b")
        await b.start(timeout=0.5)  # nobody answers the registration
        await settled(lambda: b.config["limit"] == 3)

        # A change made while the service is down is queued, applied when it is back, and reaches
        # both; b's re-registration brings the current values as well.
        await bus.publish(config_queue(name), Message(b'{"op": "set", "key": "limit", "value": 4}', "m-4"))
        config = service()
        await config.start()
        await settled(lambda: a.config["limit"] == 4 and b.config["limit"] == 4)
        assert config.state.version == 3
        assert b.versions["limit"] == 3
    finally:
        for w in (a, b):
            await w.close()
        await config.stop()
        await cleanup(
            broker_url,
            [config_queue(name), state_queue(name), watch_queue(name, "a"), watch_queue(name, "b")],
        )


async def test_the_config_service_keeps_its_state_across_restarts(bus: Broker, broker_url: str) -> None:
    name = unique("state")
    tracing = Tracing()
    try:
        first = ConfigService(name, {"limit": 1, "mode": "a"}, broker=bus, tracing=tracing)
        await first.start()
        await bus.declare(watch_queue(name, "x"))
        await first.handle("set", {"key": "limit", "value": 9})
        await first.handle("register", {"queue": watch_queue(name, "x"), "keys": ["limit"], "service": "x"})
        await first.stop()
        # The file now says other values: a changed one stays (9); one never changed follows the
        # file ("b"); a new key joins.
        second = ConfigService(name, {"limit": 1, "mode": "b", "extra": True}, broker=bus, tracing=tracing)
        await second.start()
        assert second.state.values == {"limit": 9, "mode": "b", "extra": True}
        assert second.state.versions["limit"] == 1
        assert list(second.state.watchers) == [watch_queue(name, "x")]
        # A watch queue that is gone is unregistered at the next change that concerns it.
        await second.stop()
        await cleanup(broker_url, [watch_queue(name, "x")])
        if broker_url == "memory":
            bus._queues.pop(watch_queue(name, "x"), None)  # type: ignore[attr-defined]
        third = ConfigService(name, {}, broker=bus, tracing=tracing)
        await third.start()
        await third.handle("set", {"key": "limit", "value": 10})
        assert third.state.watchers == {}
        await third.stop()
        stored = await ConfigClient(name, bus).stored()
        assert stored is not None and stored.values["limit"] == 10 and stored.watchers == {}
    finally:
        await cleanup(broker_url, [config_queue(name), state_queue(name), watch_queue(name, "x")])


async def test_a_watcher_ignores_what_is_not_newer() -> None:
    watcher = ConfigWatcher("p", "s", ["limit", POLICY_KEY], {"limit": 1}, broker=None, tracing=Tracing())  # type: ignore[arg-type]
    changes: list[tuple[str, Any, int]] = []
    watcher.changed = lambda key, value, version: changes.append((key, value, version))
    watcher.apply({"values": {"limit": 5}, "versions": {"limit": 4}})
    watcher.apply({"values": {"limit": 3}, "versions": {"limit": 2}})  # late copy of an older change
    watcher.apply({"values": {"limit": 5}, "versions": {"limit": 4}})  # duplicate
    watcher.apply({"values": {"other": 1}, "versions": {"other": 7}})  # not watched here
    watcher.apply({"values": {POLICY_KEY: {"x": 1}}, "versions": {POLICY_KEY: 8}})
    assert dict(watcher.config) == {"limit": 5}  # the policy is not a handler's config value
    assert changes == [("limit", 5, 4), (POLICY_KEY, {"x": 1}, 8)]
    with pytest.raises(TypeError):
        watcher.config["limit"] = 6  # type: ignore[index]


def test_state_snapshot_round_trip() -> None:
    state = ConfigState()
    state.change("limit", 3)
    state.watchers["s.watch"] = {"service": "s", "keys": ["limit"]}
    again = ConfigState.decode(state.encode())
    assert again == state
    assert ConfigState.decode(b"not json") is None
    assert replies_exchange("p") == "p.config.replies"


def test_a_watcher_starts_over_when_the_state_was_begun_again() -> None:
    watcher = ConfigWatcher("p", "s", ["limit"], {"limit": 1}, broker=None, tracing=Tracing())  # type: ignore[arg-type]
    watcher.apply({"values": {"limit": 30}, "versions": {"limit": 3}, "epoch": "first"})
    # The state queue was deleted: a new config service counts from 0 under a new epoch.
    watcher.apply({"values": {"limit": 2}, "versions": {"limit": 1}, "epoch": "second"})
    assert watcher.config["limit"] == 2
    watcher.apply({"values": {"limit": 4}, "versions": {"limit": 2}, "epoch": "second"})
    watcher.apply({"values": {"limit": 4}, "versions": {"limit": 2}, "epoch": "second"})  # a duplicate
    assert watcher.config["limit"] == 4 and watcher.versions == {"limit": 2}


async def test_several_values_change_as_one(bus: Broker, broker_url: str) -> None:
    name = unique("many")
    tracing = Tracing()
    config = ConfigService(name, {"a": 1, "b": 1}, broker=bus, tracing=tracing)
    await config.start()
    watcher = ConfigWatcher(name, "w", ["a", "b"], {"a": 1, "b": 1}, broker=bus, tracing=tracing)
    try:
        await watcher.start(timeout=5.0)
        answer = await ConfigClient(name, bus).request({"op": "set", "values": {"a": 2, "b": 3}}, 5.0)
        assert answer is not None and answer["values"] == {"a": 2, "b": 3}
        await settled(lambda: dict(watcher.config) == {"a": 2, "b": 3})
        assert watcher.versions == {"a": 1, "b": 2}
    finally:
        await watcher.close()
        await config.stop()
        await cleanup(broker_url, [config_queue(name), state_queue(name), watch_queue(name, "w")])


async def test_every_change_in_order_over_several_brokers(
    factory: Any, multi_urls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Pattern 4 on pattern 9: the config traffic stays on one broker, so no change overtakes another
    on its way to a watch queue, whichever broker each event of the pipeline takes."""
    from runner.config.loader import load_pipeline
    from runner.runtime.app import Runner, RunOptions

    name = unique("watch-multi")
    mod = factory.module("watch_multi", HANDLERS.replace("CONFIG_QUEUE", repr(config_queue(name))))
    path = factory.pipeline(
        f"""
        version: 1
        name: {name}
        brokers: {json.dumps(multi_urls)}
        spread: by_context(key)  # the admin events keep their order; the ticks have no key
        plugins: [plugins]
        config:
          limit: 1
        producers:
          ticks-a: {{source: "{mod}:ticks", rate: 40/s, to: {name}-a}}
          admin: {{source: "{mod}:changes", to: {name}-admin}}
        consumers:
          relay: {{from: {name}-admin, handler: "{mod}:relay"}}
          a: {{from: {name}-a, handler: "{mod}:look", watch: [limit]}}
        """
    )
    caplog.set_level(logging.INFO, logger="edarun.config")
    queues = [config_queue(name), state_queue(name), watch_queue(name, "a"), f"{name}-a", f"{name}-admin"]
    try:
        runner = Runner(load_pipeline(path), RunOptions(until_idle=True))
        assert await asyncio.wait_for(runner.run(), 90) == 0
    finally:
        if multi_urls[0] != "memory://a":
            from conftest import delete_queues

            for url in multi_urls:
                await delete_queues([*queues, "a.dashboard", "relay.dashboard"], url)
    applied = [
        (int(m.group(1)), int(m.group(2)))
        for record in caplog.records
        if (m := re.match(r"a: config limit = (\d+) \(version (\d+)\)", record.getMessage()))
    ]
    # The relay's `set`s went out back to back through ctx.publish: they stayed in order.
    assert applied == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)], applied


async def test_a_bad_command_or_a_stray_snapshot_changes_nothing(bus: Broker, broker_url: str) -> None:
    name = unique("bad")
    tracing = Tracing()
    config = ConfigService(name, {"limit": 1}, broker=bus, tracing=tracing)
    await config.start()
    client = ConfigClient(name, bus)
    try:
        for body in (b"not json", b'{"op": "set", "values": [1, 2]}', b'{"op": "launch"}', b'{"op": "set"}'):
            await bus.publish(config_queue(name), Message(body, os.urandom(4).hex()))
        # A snapshot of someone else's (or one a broker held back) arrives while the service runs.
        stray = ConfigState(version=99, values={"limit": -1}, versions={"limit": 99}, saved=999)
        await bus.publish(state_queue(name), Message(stray.encode(), "stray-snapshot"))
        answer = await client.request({"op": "set", "key": "limit", "value": 2}, timeout=5.0)
        assert answer is not None and answer["values"] == {"limit": 2}  # still serving
        assert config.state.values == {"limit": 2} and config.state.version == 1
        answer = await client.request({"op": "get"}, timeout=5.0)
        assert answer is not None and answer["values"] == {"limit": 2}  # the stray one is not the state
    finally:
        await config.stop()
        await cleanup(broker_url, [config_queue(name), state_queue(name)])


async def test_a_watch_queue_expires_once_its_service_is_gone() -> None:
    """On RabbitMQ a watch queue carries x-expires: the queue of a service that never comes back
    goes by itself; every declare of it (the watcher's, the config service's) says the same. (The
    embedded broker keeps nothing beyond its process: nothing to expire there.)"""
    import aio_pika
    import aiormq
    from conftest import AMQP_URL, amqp_available

    from runner.patterns.watch import WATCH_QUEUE_EXPIRES_S

    amqp_available()
    name = unique("expire")
    bus = connect_url(AMQP_URL)
    await bus.connect(10.0)
    tracing = Tracing()
    config = ConfigService(name, {"limit": 1}, broker=bus, tracing=tracing)
    watcher = ConfigWatcher(name, "w", ["limit"], {"limit": 1}, broker=bus, tracing=tracing)
    try:
        await config.start()
        await watcher.start(timeout=5.0)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            queue = watch_queue(name, "w")
            channel = await connection.channel()
            # A declare with the same x-expires passes; one without it is refused by the broker.
            arguments = {"x-expires": int(WATCH_QUEUE_EXPIRES_S * 1000)}
            await channel.declare_queue(queue, durable=True, arguments=arguments)
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(queue, durable=True)
    finally:
        await watcher.close()
        await config.stop()
        await bus.close()
        await cleanup(AMQP_URL, [config_queue(name), state_queue(name), watch_queue(name, "w")])
