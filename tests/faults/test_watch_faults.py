"""Watch notification and live reload across OS processes on RabbitMQ: a watching service killed
during a change gets it when it is back; an edit of the file reaches every service process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import AMQP_URL, delete_queues

from runner.patterns.flow import monitor_name
from runner.patterns.watch import config_queue, state_queue, watch_queue

from .conftest import Scenario, read_report

WATCHING = """
import time


def feed():
    for i in range({events}):
        yield {{"id": i}}


def work(event, ctx):
    time.sleep({sleep})
"""


def wait_for_line(scenario: Scenario, report: Path, text: str, timeout: float = 30.0, after: int = 0) -> int:
    """Wait until `up`'s stderr has `text` past character `after`; where it ends."""
    path = report.with_suffix(".err")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        found = content.find(text, after)
        if found >= 0:
            return found + len(text)
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear within {timeout:.0f}s:\n{scenario.stderr(report)}")


def config_cli(scenario: Scenario, *args: str) -> Any:
    """`edarun config PIPELINE …` on RabbitMQ; its JSON output."""
    command = [sys.executable, "-m", "runner", "config", str(scenario.path), *args, "--broker", AMQP_URL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_watcher_killed_during_a_change_gets_it_when_restarted(scenario: Scenario, tmp_path: Path) -> None:
    module = scenario.factory.module("watch_fault", WATCHING.format(events=1, sleep=0))
    tag, consumer = scenario.tag, scenario.consumer
    scenario.path = scenario.factory.pipeline(
        f"""
        version: 1
        name: {tag}
        plugins: [plugins]
        config: {{limit: 1}}
        producers:
          {scenario.producer}: {{source: "{module}:feed", to: {scenario.queue}}}
        consumers:
          {consumer}: {{from: {scenario.queue}, handler: "{module}:work", watch: [limit]}}
        """
    )
    queues = [config_queue(tag), state_queue(tag), watch_queue(tag, consumer)]
    report = tmp_path / "report.json"
    try:
        process = scenario.up(report, until_idle=False)
        seen = wait_for_line(scenario, report, f"{consumer}: config limit = 1 (version 0)")
        (pid,) = scenario.wait_pids(consumer)
        os.kill(pid, signal.SIGKILL)
        # While the watcher is down, from the command line, as an operator would.
        assert config_cli(scenario, "set", "limit", "7") == {"key": "limit", "value": 7, "version": 1}
        scenario.wait_pids(consumer, other_than=[pid])
        wait_for_line(scenario, report, f"{consumer}: config limit = 7 (version 1)", after=seen)
        assert config_cli(scenario, "get") == {"limit": 7}
        process.send_signal(signal.SIGTERM)
        assert scenario.finish(process, report) in (0, 130)
        assert read_report(report)["consumers"][consumer]["restarts"] == 1
    finally:
        asyncio.run(delete_queues(queues))


def test_an_edit_reaches_every_service_process(scenario: Scenario, tmp_path: Path) -> None:
    module = scenario.factory.module("reload_fault", WATCHING.format(events=1500, sleep=0.01))
    tag, consumer, queue = scenario.tag, scenario.consumer, scenario.queue

    def text(most: int, upper: int) -> str:
        return f"""
version: 1
name: {tag}
plugins: [plugins]
queues:
  {queue}: {{flow_control: upper {upper} lower {upper // 2} delay 5ms every 100ms}}
producers:
  {scenario.producer}: {{source: "{module}:feed", rate: 300/s, to: {queue}}}
consumers:
  {consumer}: {{from: {queue}, handler: "{module}:work", autoscale: depth/5 max {most} every 200ms}}
"""

    scenario.path = scenario.factory.pipeline(text(1, 100000))
    services = [consumer, scenario.producer, monitor_name(queue)]
    queues = [config_queue(tag), state_queue(tag), queue, *(watch_queue(tag, s) for s in services)]
    report = tmp_path / "report.json"
    try:
        process = scenario.up(report, "--reload")
        wait_for_line(scenario, report, "watching")  # the supervisor follows the file
        time.sleep(1.5)
        scenario.path.write_text(text(2, 100))  # 200/s of work for 300/s: it still grows
        wait_for_line(scenario, report, "applied: consumers")
        assert scenario.finish(process, report) == 0, scenario.stderr(report)
        result = read_report(report)
        assert [r["outcome"] for r in result["reloads"]] == ["applied"]
        assert result["consumers"][consumer]["max_consumers"] > 1
        assert result["consumers"][consumer]["processed"] == 1500
        slowed = [f for f in result["flow"] if f["state"] == "slow"]
        assert slowed and slowed[0]["at_s"] >= result["reloads"][0]["at_s"]
        stderr = report.with_suffix(".err").read_text()
        # Each service process applied it itself, from its own watch queue.
        assert f"{consumer}: policy applied" in stderr
        assert "flow control now upper 100" in stderr
    finally:
        asyncio.run(delete_queues(queues))
