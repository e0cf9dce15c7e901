"""Workflow event: failed events are repaired and resubmitted, or parked with every error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HANDLERS = """
import threading

CALLS = []  # (id, attempt, ok)
REPAIRS = []  # (id, error)
_lock = threading.Lock()


def trades():
    # 200 trades; 20 malformed: ten "<n> shares" (repairable), ten "lots" (not).
    for i in range(200):
        shares = 100 + i
        if i % 10 == 3:
            shares = f"{shares} shares" if i % 20 == 3 else "lots"
        yield {"id": i, "shares": shares}


def place(event, ctx):
    ok = isinstance(event["shares"], int)
    with _lock:
        CALLS.append((event["id"], ctx.attempt, ok))
    if not ok:
        raise ValueError(f"shares must be a number, got {event['shares']!r}")


def repair(event, error, ctx):
    with _lock:
        REPAIRS.append((event["id"], error))
    shares = event["shares"]
    if isinstance(shares, str) and shares.endswith(" shares"):
        return {**event, "shares": int(shares.split()[0])}
    return None


async def broken_repair(event, error, ctx):
    raise RuntimeError("the repair service is down")


AUDIT = []


DIED = []


def dying_repair(event, error, ctx):
    if not DIED:
        DIED.append(event["id"])
        raise SystemExit("the repair took its worker down")
    return repair(event, error, ctx)


def unencodable_repair(event, error, ctx):
    return {**event, "shares": 1, "tags": {1, 2}}  # a set: not JSON


def misdirected_repair(event, error, ctx):
    ctx.publish("no-such-queue", {"id": event["id"]})
    return {**event, "shares": 1}


def noisy_repair(event, error, ctx):
    ctx.publish("audit", {"repairing": event["id"], "error": error})
    return repair(event, error, ctx)


def audit(event, ctx):
    AUDIT.append(event["repairing"])


def useless_repair(event, error, ctx):
    with _lock:
        REPAIRS.append((event["id"], error))
    return {**event, "shares": "still lots"}  # "corrected", and failing again
"""


def workflow_pipeline(factory: Any, mod: str, repair: str = "repair", attempts: int = 3) -> Path:
    return factory.pipeline(
        f"""
        version: 1
        name: workflow
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:trades", to: trades}}
        consumers:
          trader:
            from: trades
            handler: "{mod}:place"
            concurrency: 2
            on_error: "workflow({mod}:{repair}) attempts {attempts}"
        """
    )


async def test_malformed_events_are_repaired_or_parked(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("wf_accept", HANDLERS)
    code, runner = await run_pipeline(workflow_pipeline(factory, mod))
    assert code == 0
    calls = factory.imported(mod).CALLS
    done = [(i, attempt) for i, attempt, ok in calls if ok]
    assert len(done) == 190 and len({i for i, _ in done}) == 190
    assert sorted(i for i, attempt in done if attempt >= 2) == [i for i in range(200) if i % 20 == 3]
    report = runner.stats.report("idle")
    trader = report["consumers"]["trader"]
    assert (trader["processed"], trader["failed"], trader["repaired"], trader["parked"]) == (190, 20, 10, 10)
    parked = report["parked_events"]
    assert sorted(p["event"]["id"] for p in parked) == [i for i in range(200) if i % 20 == 13]
    for record in parked:
        assert record["queue"] == "trades" and record["consumer"] == "trader" and record["attempts"] == 1
        assert (
            "shares must be a number, got 'lots'" in record["error"]
            and "the repair gave up" in record["error"]
        )
    # The repair saw the handler's error.
    assert all("ValueError: shares must be a number" in error for _, error in factory.imported(mod).REPAIRS)


async def test_a_repair_that_crashes_parks_the_event_with_both_errors(
    factory: Any, run_pipeline: Any
) -> None:
    mod = factory.module("wf_broken", HANDLERS)
    code, runner = await run_pipeline(workflow_pipeline(factory, mod, repair="broken_repair"))
    assert code == 0
    report = runner.stats.report("idle")
    assert report["consumers"]["trader"]["parked"] == 20
    assert report["consumers"]["trader"]["repaired"] == 0
    for record in report["parked_events"]:
        assert "ValueError: shares must be a number" in record["error"]
        assert "the repair failed too: RuntimeError: the repair service is down" in record["error"]


async def test_an_event_is_parked_after_its_attempts(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("wf_useless", HANDLERS)
    code, runner = await run_pipeline(workflow_pipeline(factory, mod, repair="useless_repair", attempts=2))
    assert code == 0
    calls = factory.imported(mod).CALLS
    one = [attempt for i, attempt, _ in calls if i == 13]
    assert one == [1, 2, 3]  # the first delivery and two repaired ones
    assert [i for i, _ in factory.imported(mod).REPAIRS].count(13) == 2
    trader = runner.stats.report("idle")["consumers"]["trader"]
    assert (trader["repaired"], trader["parked"], trader["failed"]) == (40, 20, 60)
    record = next(p for p in runner.stats.parked_events if p["event"]["id"] == 13)
    assert "(after 2 repairs)" in record["error"] and record["attempts"] == 3


async def test_the_whole_journey_is_one_trace(factory: Any, run_pipeline: Any, tmp_path: Path) -> None:
    from runner.traces_view import load_traces

    mod = factory.module("wf_traced", HANDLERS)
    traces = tmp_path / "traces.jsonl"
    code, _ = await run_pipeline(workflow_pipeline(factory, mod), traces=f"file({traces})")
    assert code == 0
    by_trace = load_traces(traces)
    repaired = [
        spans for spans in by_trace.values()
        if any(s["attributes"].get("edarun.workflow.action") == "resubmit" for s in spans)
    ]  # fmt: skip
    assert len(repaired) == 10
    for spans in repaired:
        names = sorted(s["name"] for s in spans)
        assert names == sorted([
            "send trades", "process trades", "send trader.workflow", "process trader.workflow",
            "send trades", "process trades",
        ]), names  # fmt: skip
        by_id = {s["spanId"]: s for s in spans}
        failed = [s for s in spans if s["attributes"].get("edarun.workflow.action") == "workflow"]
        assert len(failed) == 1 and failed[0]["status"].get("code") == 2  # ERROR
        resubmit = next(s for s in spans if s["name"] == "process trader.workflow")
        assert by_id[resubmit["parentSpanId"]]["name"] == "send trader.workflow"
        assert by_id[by_id[resubmit["parentSpanId"]]["parentSpanId"]] is failed[0]
        last = [s for s in spans if s["name"] == "process trades" and s is not failed[0]]
        assert last[0]["attributes"]["edarun.attempt"] == 2
        assert by_id[by_id[last[0]["parentSpanId"]]["parentSpanId"]] is resubmit
    parked = [
        spans for spans in by_trace.values()
        if any(s["attributes"].get("edarun.workflow.action") == "park" for s in spans)
    ]  # fmt: skip
    assert len(parked) == 10
    assert all(any(s["name"] == "send trader.dashboard" for s in spans) for spans in parked)


async def test_what_a_repair_publishes_goes_out(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("wf_noisy", HANDLERS)
    path = factory.pipeline(
        f"""
        version: 1
        name: workflow-audit
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:trades", to: trades}}
        consumers:
          trader: {{from: trades, handler: "{mod}:place", on_error: "workflow({mod}:noisy_repair)"}}
          auditor: {{from: audit, handler: "{mod}:audit"}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    # Every repair call published, the ones that gave up too (they returned, they did not raise).
    assert sorted(factory.imported(mod).AUDIT) == [i for i in range(200) if i % 10 == 3]
    assert runner.stats.consumers["trader"].repaired == 10


def test_times_in_headers_survive_amqp() -> None:
    """AMQP carries a float header in 32 bits: times travel as text."""
    import pamqp.decode
    import pamqp.encode

    from runner.patterns.workflow import FIRST_FAILURE, failure_headers

    headers = failure_headers({}, ValueError("x"), consumer="c", queue="q", attempt=1)
    decoded = pamqp.decode.field_table(pamqp.encode.field_table(headers))[1]
    assert abs(float(decoded[FIRST_FAILURE]) - float(headers[FIRST_FAILURE])) < 0.001


async def test_a_repair_that_cannot_be_published_is_parked_not_looped(
    factory: Any, run_pipeline: Any
) -> None:
    for repair_name in ("unencodable_repair", "misdirected_repair"):
        mod = factory.module(f"wf_{repair_name}", HANDLERS)
        code, runner = await run_pipeline(workflow_pipeline(factory, mod, repair=repair_name))
        assert code == 0
        trader = runner.stats.report("idle")["consumers"]["trader"]
        assert (trader["processed"], trader["repaired"], trader["parked"]) == (180, 0, 20), repair_name
        assert all("the repair's result was not published" in p["error"] for p in runner.stats.parked_events)


async def test_a_repair_that_kills_its_worker_is_counted_and_retried(factory: Any, run_pipeline: Any) -> None:
    mod = factory.module("wf_dying", HANDLERS)
    code, runner = await run_pipeline(workflow_pipeline(factory, mod, repair="dying_repair"))
    assert code == 0
    trader = runner.stats.report("idle")["consumers"]["trader"]
    assert trader["restarts"] == 1
    assert (trader["repaired"], trader["parked"]) == (10, 10)  # the dead worker's event came again
