"""`edarun dashboard` on RabbitMQ: the parked events outlive the run; list, show, resubmit, drop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import AMQP_URL, amqp_available, delete_queues

from runner.config.loader import load_pipeline
from runner.runtime.app import queues_of
from runner.runtime.dashboard import dashboard_queue

HANDLERS = """
import os


def trades():
    for i in range(200):
        shares = 100 + i
        if i % 10 == 3:
            shares = f"{shares} shares" if i % 20 == 3 else "lots"
        yield {"id": i, "shares": shares}


def place(event, ctx):
    if not isinstance(event["shares"], int):
        raise ValueError(f"shares must be a number, got {event['shares']!r}")
    with open(os.environ["DONE_LOG"], "a") as log:
        log.write(f"{event['id']} {ctx.attempt}\\n")


def repair(event, error, ctx):
    shares = event["shares"]
    if isinstance(shares, str) and shares.endswith(" shares"):
        return {**event, "shares": int(shares.split()[0])}
    return None
"""


def edarun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def pipeline(factory: Any, brokers: list[str] | None = None) -> Path:
    mod = factory.module("dash_trades", HANDLERS)
    return factory.pipeline(
        f"""
        version: 1
        name: dashboard-test
        {f"brokers: {json.dumps(brokers)}" if brokers else ""}
        {"spread: by_context(id)" if brokers else ""}
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:trades", to: dash-trades}}
        consumers:
          dash-trader: {{from: dash-trades, handler: "{mod}:place", on_error: "workflow({mod}:repair)"}}
        """
    )


async def test_parked_events_outlive_the_run(factory: Any, tmp_path: Path) -> None:
    amqp_available()
    path = pipeline(factory)

    async def dash(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(edarun, "dashboard", str(path), *args, "--broker", AMQP_URL)

    loaded = load_pipeline(path)
    names = [*queues_of(loaded), dashboard_queue("dash-trader")]
    await delete_queues(names)
    done = tmp_path / "done.log"
    env = {"DONE_LOG": str(done)}
    try:
        report = tmp_path / "report.json"
        up = await asyncio.to_thread(
            edarun, "up", str(path), "--broker", AMQP_URL, "--until-idle", "--report", str(report), env=env
        )
        assert up.returncode == 0, up.stderr[-2000:]
        counts = json.loads(report.read_text())["consumers"]["dash-trader"]
        assert (counts["processed"], counts["repaired"], counts["parked"]) == (190, 10, 10)

        listed = await dash("list", "--json")
        assert listed.returncode == 0, listed.stderr
        records = json.loads(listed.stdout)
        assert sorted(r["event"]["id"] for r in records) == [i for i in range(200) if i % 20 == 13]
        for record in records:
            assert {"id", "queue", "consumer", "error", "attempts", "event"} <= set(record)
            assert record["queue"] == "dash-trades" and "got 'lots'" in record["error"]
        again = json.loads((await dash("list", "--json")).stdout)
        assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)  # listing took nothing

        first, second = records[0], records[1]
        shown = await dash("show", first["id"])
        assert shown.returncode == 0 and json.loads(shown.stdout)["event"] == first["event"]

        edited = json.dumps({**first["event"], "shares": 7})
        resubmitted = await dash("resubmit", first["id"], "--event", edited)
        assert resubmitted.returncode == 0, resubmitted.stderr
        assert "to dash-trades as attempt 2" in resubmitted.stdout

        unconfirmed = await dash("drop", second["id"])
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
        dropped = await dash("drop", second["id"], "--yes")
        assert dropped.returncode == 0, dropped.stderr
        missing = await dash("show", second["id"])
        assert missing.returncode == 2

        left = json.loads((await dash("list", "--json")).stdout)
        assert len(left) == 8 and {first["id"], second["id"]}.isdisjoint(r["id"] for r in left)

        # The resubmitted event runs on the next start of the consumer, as attempt 2.
        rerun = await asyncio.to_thread(
            edarun, "up", str(path), "--only", "dash-trader", "--broker", AMQP_URL, "--until-idle", env=env
        )
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"{first['event']['id']} 2" in done.read_text().splitlines()
    finally:
        await delete_queues(names)


async def test_with_several_brokers_the_dashboard_reads_them_all(
    factory: Any, second_node: Any, tmp_path: Path
) -> None:
    """Pattern 9: events are parked on whichever broker a parking publish went to; `list` shows
    those of every broker (saying where), and `resubmit` and `drop` find them there."""
    urls = [AMQP_URL, second_node.url]
    path = pipeline(factory, urls)

    async def dash(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(edarun, "dashboard", str(path), *args)

    loaded = load_pipeline(path)
    names = [*queues_of(loaded), dashboard_queue("dash-trader")]
    for url in urls:
        await delete_queues(names, url)
    try:
        up = await asyncio.to_thread(edarun, "up", str(path), "--until-idle", env={"DONE_LOG": "/dev/null"})
        assert up.returncode == 0, up.stderr[-2000:]
        listed = await dash("list", "--json")
        assert listed.returncode == 0, listed.stderr
        records = json.loads(listed.stdout)
        assert sorted(r["event"]["id"] for r in records) == [i for i in range(200) if i % 20 == 13]
        parked = {url.replace("guest:guest@", "guest:***@"): await parked_on(url) for url in urls}
        assert sum(parked.values()) == 10
        assert {r["broker"] for r in records} == {url for url, count in parked.items() if count}
        elsewhere = records[-1]
        resubmitted = await dash("resubmit", elsewhere["id"], "--event", json.dumps({"id": 1, "shares": 7}))
        assert resubmitted.returncode == 0, resubmitted.stderr
        dropped = await dash("drop", records[0]["id"], "--yes")
        assert dropped.returncode == 0, dropped.stderr
        left = json.loads((await dash("list", "--json")).stdout)
        assert len(left) == 8 and {elsewhere["id"], records[0]["id"]}.isdisjoint(r["id"] for r in left)
    finally:
        for url in urls:
            await delete_queues(names, url)


async def parked_on(url: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dashboard_queue("dash-trader"), passive=True)
        return int(queue.declaration_result.message_count or 0)


def test_on_memory_the_dashboard_is_the_report(factory: Any) -> None:
    path = pipeline(factory)
    result = edarun("dashboard", str(path), "list")
    assert result.returncode == 2 and "parked_events" in result.stderr and "Traceback" not in result.stderr
    assert edarun("dashboard", str(path), "show").returncode == 2  # which ID?
