"""A RabbitMQ node of our own beside the machine's (127.0.0.1:5672): the second broker of the
multi-broker tests, benchmark and example (pattern 9).

It runs the installed server with everything in a temporary folder (its Erlang cookie, data, logs,
config without plugins, so it does not compete for the management port), under a node name and on
ports of its own, and `stop` halts it and removes the folder, whatever happened before:

    with RabbitNode() as node:          # or node = RabbitNode(); node.start(); ... node.stop()
        node.url                        # amqp://guest:guest@127.0.0.1:<port>/
        node.stop_app(); node.start_app()   # an outage: durable queues and persistent messages survive
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

SERVER = os.environ.get("EDARUN_RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = os.environ.get("EDARUN_RABBITMQ_CTL", "/usr/lib/rabbitmq/bin/rabbitmqctl")


class NodeError(RuntimeError):
    """The node could not be started or controlled."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def available() -> bool:
    """Whether this machine can start a node (the server scripts are installed)."""
    return Path(SERVER).is_file() and Path(CTL).is_file()


class RabbitNode:
    def __init__(self, name: str = "edarun-b") -> None:
        # The pid keeps two test sessions on one machine from sharing a node name.
        self.node = f"{name}-{os.getpid()}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.process: subprocess.Popen[bytes] | None = None
        config = self.folder / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (self.folder / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "HOME": str(self.folder),  # its own Erlang cookie, which rabbitmqctl reads from here too
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.folder / "pid"),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",  # the machine's node name is not ours
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 90.0) -> None:
        if not available():
            raise NodeError(f"no RabbitMQ server at {SERVER}")
        with (self.folder / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                [SERVER], env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of its user is not its stop: `stop` is
            )  # fmt: skip
        try:
            self.wait_until_up(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_until_up(self, timeout: float = 60.0) -> None:
        """Until it accepts AMQP connections (listening alone comes before the broker is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NodeError(f"{self.node} exited ({self.process.returncode}): {self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.25)
        raise NodeError(f"{self.node} did not accept connections within {timeout:.0f}s: {self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(2)
                return sock.recv(1)[:1] == b"\x01"  # connection.start: a frame of type 1
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 60.0) -> None:
        command = [CTL, "-n", self.node, *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")

    def stop_app(self) -> None:
        """Stop the broker, not the node: connections close, queues and messages stay on disk."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = 60.0) -> None:
        self.ctl("start_app")
        self.wait_until_up(timeout)

    def log_tail(self, lines: int = 15) -> str:
        path = self.folder / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Halt the node and remove its folder; never raises."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(NodeError, subprocess.TimeoutExpired, OSError):
                self.ctl("stop", timeout=30)
            for signal_ in (None, signal.SIGTERM, signal.SIGKILL):
                if signal_ is not None:  # the script and its Erlang VM: the session it leads
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal_)
                try:
                    process.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
