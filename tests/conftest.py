"""Shared fixtures: brokers under test and pipelines written to a temporary folder."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from runner.brokers import Broker, connect_url

# Every transport and pattern test runs on each of these brokers.
BROKERS = ["memory", "amqp"]
AMQP_URL = os.environ.get("EDARUN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REQUIRE_AMQP = os.environ.get("EDARUN_REQUIRE_AMQP") == "1"
_unique = itertools.count()
_amqp_checked: list[bool] = []


def amqp_available() -> bool:
    """Whether RabbitMQ answers; in CI (EDARUN_REQUIRE_AMQP=1) its absence fails the test instead."""
    if not _amqp_checked:
        try:
            with socket.create_connection(("127.0.0.1", 5672), timeout=2):
                _amqp_checked.append(True)
        except OSError:
            _amqp_checked.append(False)
    if _amqp_checked[0]:
        return True
    if REQUIRE_AMQP:
        pytest.fail("RabbitMQ is required (EDARUN_REQUIRE_AMQP=1) but 127.0.0.1:5672 does not answer")
    pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return False


async def delete_queues(names: list[str]) -> None:
    """Remove what a test declared on RabbitMQ (queues outlive the test there)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)


@pytest.fixture(params=BROKERS)
def broker_url(request: pytest.FixtureRequest) -> str:
    """`memory` or the test RabbitMQ's URL: the parameter every transport and pattern test takes."""
    if request.param == "amqp":
        amqp_available()
        return AMQP_URL
    return "memory"


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    instance = connect_url(broker_url)
    await instance.connect(10.0)
    yield instance
    declared = list(getattr(instance, "_declared", ()))
    await instance.close()
    if declared:
        await delete_queues(declared)


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> str:
    """A queue name no other test uses (brokers outlive a test on RabbitMQ)."""
    return f"test.{request.node.name[:40]}.{os.getpid()}.{next(_unique)}".replace("[", "-").replace("]", "")


class PipelineFactory:
    """Writes a pipeline YAML and its plugin modules (with names unique to the test) to a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.plugins = folder / "plugins"
        self.plugins.mkdir(exist_ok=True)
        self.suffix = f"{os.getpid()}_{next(_unique)}"

    def module(self, stem: str, source: str) -> str:
        """Write a plugin module; returns its unique module name."""
        name = f"{stem}_{self.suffix}"
        (self.plugins / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    def data(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def pipeline(self, yaml_text: str, name: str = "pipeline.yaml") -> Path:
        path = self.folder / name
        path.write_text(textwrap.dedent(yaml_text))
        return path


@pytest.fixture
def factory(tmp_path: Path) -> PipelineFactory:
    return PipelineFactory(tmp_path)


@pytest.fixture
def jsonl(factory: PipelineFactory) -> Callable[[str, list[dict]], Path]:
    import json

    def write(name: str, events: list[dict]) -> Path:
        return factory.data(name, "".join(json.dumps(e) + "\n" for e in events))

    return write


@pytest.fixture
async def run_pipeline(broker_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Run a pipeline file in this process until idle, on the broker under test.

    On RabbitMQ the pipeline's queues (and its dashboard queues) are deleted before and after, so
    a test never sees what an earlier run left behind.
    """
    from runner.config.loader import load_pipeline
    from runner.runtime.app import Runner, RunOptions, queues_of
    from runner.runtime.dashboard import dashboard_queue

    used: list[str] = []

    async def run(path: Path, **options: Any) -> tuple[int, Runner]:
        loaded = load_pipeline(path)
        if broker_url != "memory":
            names = [*queues_of(loaded), *(dashboard_queue(c) for c in loaded.model.consumers)]
            await delete_queues(names)
            used.extend(names)
            options.setdefault("broker", broker_url)
        options.setdefault("until_idle", True)
        runner = Runner(loaded, RunOptions(**options))
        code = await asyncio.wait_for(runner.run(), 90)
        return code, runner

    yield run
    if used:
        await delete_queues(used)
