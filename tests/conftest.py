"""Shared fixtures: brokers under test and pipelines written to a temporary folder."""

from __future__ import annotations

import itertools
import os
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from runner.brokers import Broker, MemoryBroker

# Every transport test runs on each broker here; RabbitMQ joins this list with the amqp broker.
BROKERS = ["memory"]
REQUIRE_AMQP = os.environ.get("EDARUN_REQUIRE_AMQP") == "1"
_unique = itertools.count()


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    instance: Broker = MemoryBroker()
    await instance.connect(5.0)
    yield instance
    await instance.close()


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
