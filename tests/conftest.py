"""Shared fixtures: brokers under test and pipelines written to a temporary folder."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.brokers import Broker, connect_url

# tools/rabbitmq_node.py: the second RabbitMQ node of the multi-broker tests (pattern 9).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import rabbitmq_node

# Every transport and pattern test runs on each of these brokers.
BROKERS = ["memory", "amqp"]
# The tests' own virtual host, so nothing else using the broker (another run, a demo) shares
# their queue names; created on first use with rabbitmqctl, removed at the end of the session.
_VHOST = f"edarun-test-{os.getpid()}"
AMQP_URL = os.environ.get("EDARUN_TEST_AMQP_URL", f"amqp://guest:guest@127.0.0.1:5672/{_VHOST}")
_OWN_VHOST = "EDARUN_TEST_AMQP_URL" not in os.environ
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
        if _amqp_checked[0] and _OWN_VHOST:
            _rabbitmqctl("add_vhost", _VHOST)
            _rabbitmqctl("set_permissions", "-p", _VHOST, "guest", ".*", ".*", ".*")
    if _amqp_checked[0]:
        return True
    if REQUIRE_AMQP:
        pytest.fail("RabbitMQ is required (EDARUN_REQUIRE_AMQP=1) but 127.0.0.1:5672 does not answer")
    pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    return False


def _rabbitmqctl(*args: str) -> None:
    import subprocess

    subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _amqp_checked and _amqp_checked[0] and _OWN_VHOST:
        _rabbitmqctl("delete_vhost", _VHOST)


async def delete_queues(names: list[str], url: str = AMQP_URL) -> None:
    """Remove what a test declared on RabbitMQ (queues outlive the test there)."""
    import aio_pika

    connection = await aio_pika.connect(url)
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


@pytest.fixture(scope="session")
def second_node() -> Iterator[rabbitmq_node.RabbitNode]:
    """A second RabbitMQ node of the session's own, beside 127.0.0.1:5672 (pattern 9): started for
    the first test that needs it, stopped at the end of the session, also when tests failed."""
    amqp_available()
    node = rabbitmq_node.RabbitNode("edarun-test-b")
    try:
        node.start()
    except rabbitmq_node.NodeError as exc:
        if REQUIRE_AMQP:
            pytest.fail(f"a second RabbitMQ node is required (EDARUN_REQUIRE_AMQP=1): {exc}")
        pytest.skip(f"cannot start a second RabbitMQ node: {exc}")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(params=BROKERS)
def multi_urls(request: pytest.FixtureRequest) -> list[str]:
    """Two brokers for a multi-broker test: two embedded ones, or RabbitMQ and a second node."""
    if request.param == "amqp":
        node: rabbitmq_node.RabbitNode = request.getfixturevalue("second_node")
        return [AMQP_URL, node.url]
    return ["memory://a", "memory://b"]


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

    def imported(self, name: str) -> Any:
        """The plugin module `name`, imported as the pipeline will import it."""
        import importlib
        import sys

        if str(self.plugins) not in sys.path:
            sys.path.insert(0, str(self.plugins))
        return importlib.import_module(name)

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


class SyncRuns:
    """For hypothesis tests, which cannot use function-scoped async fixtures per example: a fresh
    folder for each example and a synchronous run of a pipeline on the broker under test."""

    def __init__(self, tmp: pytest.TempPathFactory, broker_url: str) -> None:
        self.tmp, self.broker_url = tmp, broker_url

    def new(self) -> PipelineFactory:
        return PipelineFactory(self.tmp.mktemp("example"))

    def run(self, path: Path) -> tuple[int, Any]:
        from runner.config.loader import load_pipeline
        from runner.runtime import loop as event_loop
        from runner.runtime.app import Runner, RunOptions, queues_of
        from runner.runtime.dashboard import dashboard_queue

        loaded = load_pipeline(path)
        options = RunOptions(until_idle=True)
        names = [*queues_of(loaded), *(dashboard_queue(c) for c in loaded.model.consumers)]
        if self.broker_url != "memory":
            event_loop.run(delete_queues(names))
            options.broker = self.broker_url
        runner = Runner(loaded, options)
        try:
            code = event_loop.run(asyncio.wait_for(runner.run(), 60))
        finally:
            if self.broker_url != "memory":
                event_loop.run(delete_queues(names))
        return code, runner


@pytest.fixture
def sync_runs(tmp_path_factory: pytest.TempPathFactory, broker_url: str) -> SyncRuns:
    return SyncRuns(tmp_path_factory, broker_url)
