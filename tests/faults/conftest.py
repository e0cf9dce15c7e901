"""Fixtures of the fault tests: one pipeline per test on RabbitMQ, its processes, its evidence.

A `Scenario` owns what one fault test puts on the broker and on the machine: queue and service names
unique to the test and this pytest process, the pipeline file, the `edarun up` processes it starts
and the file the handler appends one line per call to (`"<id> <redelivered 0/1>"`, written with a
single `write` on an O_APPEND descriptor, so a `kill -9` loses nothing already written and two
processes never interleave a line). Its queues (dashboard included) are deleted before and after,
and whatever it started is stopped at teardown even when the test failed halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import AMQP_URL, PipelineFactory, amqp_available, delete_queues

LOG_ENV = "EDARUN_FAULT_LOG"
UP_TIMEOUT = 90.0  # the longest one `edarun up` of these tests may take

HANDLER = """
import os
import time

_LOG = os.open(os.environ["{env}"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
SLEEP = {sleep!r}
FAIL_EVERY = {fail_every!r}


def handle(event, ctx):
    if SLEEP:
        time.sleep(SLEEP)
    os.write(_LOG, f"{{event['id']}} {{int(ctx.redelivered)}}\\n".encode())
    if FAIL_EVERY and event["id"] % FAIL_EVERY == 1:
        raise RuntimeError(f"refusing event {{event['id']}}")
"""


def failing(fail_every: int, events: int) -> set[int]:
    """The ids the handler written with `fail_every` always raises for."""
    return {i for i in range(events) if fail_every and i % fail_every == 1}


@dataclass
class Calls:
    """What the handler log says: every call as (id, redelivered), in the order they were written."""

    lines: list[tuple[int, bool]]

    @property
    def counts(self) -> Counter[int]:
        return Counter(i for i, _ in self.lines)

    @property
    def ids(self) -> set[int]:
        return {i for i, _ in self.lines}

    @property
    def duplicates(self) -> int:
        """Calls beyond the first of each id."""
        return len(self.lines) - len(self.ids)

    @property
    def redelivered(self) -> int:
        return sum(1 for _, flag in self.lines if flag)

    def repeats_unmarked(self) -> list[int]:
        """Ids called again on a delivery the broker did not mark as redelivered."""
        seen: set[int] = set()
        unmarked = []
        for i, flag in self.lines:
            if i in seen and not flag:
                unmarked.append(i)
            seen.add(i)
        return unmarked


@dataclass
class Scenario:
    """One fault test's pipeline, broker names, processes and handler log."""

    factory: PipelineFactory
    folder: Path
    tag: str
    queue: str
    producer: str
    consumer: str
    log: Path
    path: Path | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def queues(self) -> list[str]:
        return [self.queue, f"{self.queue}.priority", f"{self.consumer}.dashboard"]

    # -- the pipeline --------------------------------------------------------------------------

    def write(
        self,
        *,
        events: int,
        rate: int | None,
        consumer: dict[str, Any],
        sleep: float = 0.0,
        fail_every: int = 0,
    ) -> Path:
        """Write the events file, the handler module and a producer → queue → consumer pipeline."""
        self.factory.data("events.jsonl", "".join(f'{{"id": {i}}}\n' for i in range(events)))
        module = self.factory.module(
            "fault_handler", HANDLER.format(env=LOG_ENV, sleep=sleep, fail_every=fail_every)
        )
        options = {"from": self.queue, "handler": f"{module}:handle", **consumer}
        producer: dict[str, Any] = {"source": "file(events.jsonl)", "to": self.queue}
        if rate is not None:
            producer["rate"] = f"{rate}/s"
        self.path = self.factory.pipeline(
            f"""
            version: 1
            name: {self.tag}
            plugins: [plugins]
            producers:
              {self.producer}: {json.dumps(producer)}
            consumers:
              {self.consumer}: {json.dumps(options)}
            """
        )
        return self.path

    # -- processes -----------------------------------------------------------------------------

    def up(
        self, report: Path, *extra: str, until_idle: bool = True, broker: str | None = AMQP_URL
    ) -> subprocess.Popen[bytes]:
        """Start `edarun up` on RabbitMQ as a user would; its output goes to files beside the report.
        `broker=None`: on the brokers the pipeline file names."""
        assert self.path is not None, "write() the pipeline first"
        command = [sys.executable, "-m", "runner", "up", str(self.path)]
        command += ["--broker", broker] if broker is not None else []
        command += [*(["--until-idle"] if until_idle else []), "--report", str(report), *extra]
        with (
            report.with_suffix(".out").open("wb") as out,
            report.with_suffix(".err").open("wb") as err,
        ):
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, LOG_ENV: str(self.log)},
            )
        self.started.append(process)
        return process

    def finish(self, process: subprocess.Popen[bytes], report: Path, timeout: float = UP_TIMEOUT) -> int:
        """Wait for `up` to end; its exit code (the test fails with its stderr if it hangs)."""
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"edarun up did not end within {timeout:.0f}s:\n{self.stderr(report)}")

    @staticmethod
    def stderr(report: Path, tail: int = 40) -> str:
        path = report.with_suffix(".err")
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-tail:])

    def pids(self, service: str) -> list[int]:
        """The service processes the supervisor runs for `service` (`runner service PATH NAME …`)."""
        pattern = f"runner service {re.escape(str(self.path))} {re.escape(service)} --instance"
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10)
        return sorted(int(pid) for pid in found.stdout.split())

    def wait_pids(
        self, service: str, count: int = 1, *, other_than: Collection[int] = (), timeout: float = 20.0
    ) -> list[int]:
        """Wait until `count` processes of `service` run (none of them in `other_than`)."""
        found: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [pid for pid in self.pids(service) if pid not in other_than]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        pytest.fail(f"{count} process(es) of {service} did not appear within {timeout:.0f}s (saw {found})")

    def calls(self) -> Calls:
        if not self.log.exists():
            return Calls([])
        lines = []
        for raw in self.log.read_text().splitlines():
            ident, flag = raw.split()
            lines.append((int(ident), flag == "1"))
        return Calls(lines)

    def lines(self) -> int:
        """Handler calls so far (cheap enough to poll)."""
        try:
            with self.log.open("rb") as file:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 16), b""))
        except FileNotFoundError:
            return 0

    def wait_calls(self, count: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """Wait until the handler was called `count` times in all, while `up` still runs."""
        deadline = time.monotonic() + timeout
        while self.lines() < count:
            if process.poll() is not None:
                pytest.fail(f"edarun up ended (exit {process.returncode}) before {count} handler calls")
            if time.monotonic() > deadline:
                pytest.fail(f"only {self.lines()} of {count} handler calls within {timeout:.0f}s")
            time.sleep(0.02)

    def stop_all(self) -> None:
        """Stop what this test started: its `up` processes, then any service they left behind."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        if self.path is None:
            return
        # Services run in sessions of their own: an `up` killed hard leaves them behind.
        pattern = f"runner service {re.escape(str(self.path))} "
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10)
        for pid in found.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def read_report(path: Path) -> dict[str, Any]:
    assert path.exists(), f"no report at {path}"
    report: dict[str, Any] = json.loads(path.read_text())
    return report


@pytest.fixture
def scenario(request: pytest.FixtureRequest, factory: PipelineFactory, tmp_path: Path) -> Iterator[Scenario]:
    """A fault test's own names on RabbitMQ (deleted before and after) and its processes."""
    amqp_available()
    short = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-")
    tag = f"fault-{short}-{os.getpid()}"
    scene = Scenario(
        factory=factory,
        folder=tmp_path,
        tag=tag,
        queue=f"{tag}.work",
        producer=f"{tag}-feed",
        consumer=f"{tag}-sink",
        log=tmp_path / "calls.log",
    )
    asyncio.run(delete_queues(scene.queues))
    try:
        yield scene
    finally:
        scene.stop_all()
        wait_for_broker()
        asyncio.run(delete_queues(scene.queues))


# -- the broker itself ---------------------------------------------------------------------------


def rabbitmqctl_command() -> list[str]:
    """How to run rabbitmqctl: $EDARUN_RABBITMQCTL (e.g. `docker exec rabbit rabbitmqctl`) or PATH."""
    configured = os.environ.get("EDARUN_RABBITMQCTL")
    if configured:
        return shlex.split(configured)
    found = shutil.which("rabbitmqctl")
    if found is None:
        pytest.skip("rabbitmqctl is not on PATH (set EDARUN_RABBITMQCTL to run broker faults)")
    return [found]


def rabbitmqctl(*args: str, timeout: float = 60.0) -> None:
    command = [*rabbitmqctl_command(), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(command)} failed: {result.stderr or result.stdout}"


def wait_for_broker(timeout: float = 60.0) -> None:
    """Wait until RabbitMQ accepts AMQP connections again (after a restart of its app)."""
    import aio_pika

    async def connects() -> bool:
        try:
            connection = await aio_pika.connect(AMQP_URL, timeout=2)
        except Exception:
            return False
        await connection.close()
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", 5672), timeout=2):
                pass
        except OSError:
            time.sleep(0.25)
            continue
        if asyncio.run(connects()):
            return
        time.sleep(0.25)
    raise AssertionError(f"RabbitMQ did not accept connections within {timeout:.0f}s")


@pytest.fixture
def broker_control() -> Callable[..., None]:
    """`rabbitmqctl` for the test (skips when it is not available)."""
    rabbitmqctl_command()
    return rabbitmqctl
