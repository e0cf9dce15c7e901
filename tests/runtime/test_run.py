"""Running pipelines end to end on the embedded broker: idle detection, counts, retries, parking."""

from __future__ import annotations

import json

from runner.redact import redact_url


async def test_two_stage_pipeline_runs_to_idle_with_exact_report(  # type: ignore[no-untyped-def]
    factory, jsonl, tmp_path, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(50)])
    mod = factory.module(
        "stages",
        """
        def double(event, ctx):
            return {"n": event["n"], "doubled": event["n"] * 2}

        async def fan_out(event, ctx):
            return [{"n": event["n"], "part": p} for p in range(2)]

        SEEN = []

        def sink(event, ctx):
            SEEN.append(event)
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: stages
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: a}}
        consumers:
          first: {{from: a, handler: "{mod}:double", emit: b, concurrency: 3}}
          second: {{from: b, handler: "{mod}:fan_out", emit: c}}
          third: {{from: c, handler: "{mod}:sink", concurrency: 2}}
        """
    )
    report = tmp_path / "report.json"
    code, _ = await run_pipeline(path, report=report)
    assert code == 0
    data = json.loads(report.read_text())
    assert data["pipeline"] == "stages"
    assert data["producers"] == {"feed": {"published": 50, "rejected": 0}}
    assert data["consumers"]["first"]["processed"] == 50
    assert data["consumers"]["second"]["processed"] == 50
    assert data["consumers"]["third"]["processed"] == 100
    assert data["consumers"]["first"]["max_consumers"] == 3
    for name in ("first", "second", "third"):
        assert data["consumers"][name]["failed"] == 0
        assert data["consumers"][name]["parked"] == 0
        assert data["consumers"][name]["restarts"] == 0
    assert set(data["queues"]) == {"a", "b", "c"}
    assert data["elapsed_s"] > 0 and data["flow"] == []
    import importlib

    seen = importlib.import_module(mod).SEEN
    assert sorted((e["n"], e["part"]) for e in seen) == [(n, p) for n in range(50) for p in range(2)]


async def test_failing_handler_is_retried_then_parked_nothing_lost(  # type: ignore[no-untyped-def]
    factory, jsonl, tmp_path, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(30)])
    mod = factory.module(
        "flaky",
        """
        CALLS = {}

        def handle(event, ctx):
            CALLS.setdefault(event["n"], []).append((ctx.attempt, ctx.redelivered))
            if event["n"] % 10 == 0:
                raise ValueError(f"cannot handle {event['n']}")
            if event["n"] % 10 == 1 and ctx.attempt == 1:
                raise RuntimeError("transient")
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: flaky
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:handle"
            on_error: {{action: retry, retries: 2, backoff: 5ms}}
        """
    )
    code, runner = await run_pipeline(path, report=tmp_path / "r.json")
    assert code == 0
    stats = json.loads((tmp_path / "r.json").read_text())["consumers"]["worker"]
    # 3 always fail (0, 10, 20): 3 attempts each; 3 fail once (1, 11, 21) then succeed.
    assert stats["processed"] == 27
    assert stats["failed"] == 3 * 3 + 3
    assert stats["retried"] == 3 * 2 + 3
    assert stats["parked"] == 3
    import importlib

    calls = importlib.import_module(mod).CALLS
    assert [a for a, _ in calls[0]] == [1, 2, 3]
    assert [a for a, _ in calls[1]] == [1, 2]
    parked = runner.stats.parked_events
    assert sorted(p["event"]["n"] for p in parked) == [0, 10, 20]
    assert all(p["attempts"] == 3 and p["consumer"] == "worker" and p["queue"] == "work" for p in parked)
    assert all(p["error"].startswith("ValueError: cannot handle") for p in parked)
    assert len({p["id"] for p in parked}) == 3


async def test_dead_letter_parks_at_once(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(5)])
    mod = factory.module("dl", "def handle(event, ctx):\n    raise KeyError('missing')\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: dl
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", on_error: dead_letter}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    stats = runner.stats.consumers["worker"]
    assert (stats.processed, stats.failed, stats.retried, stats.parked) == (0, 5, 0, 5)


async def test_handler_returning_wrong_type_fails_the_event(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module("wrong", "def handle(event, ctx):\n    return 'not an event'\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: wrong
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", emit: out, on_error: dead_letter}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert runner.stats.consumers["worker"].parked == 1
    assert "HandlerResultError" in runner.stats.parked_events[0]["error"]


async def test_ctx_fields_threads_and_publish(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline, broker_url
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(6)])
    mod = factory.module(
        "ctxmod",
        """
        import asyncio
        import threading
        SEEN = []
        OUT = []

        def sync_handler(event, ctx):
            SEEN.append(dict(
                thread=threading.current_thread().name, queue=ctx.queue, consumer=ctx.consumer,
                worker=ctx.worker, attempt=ctx.attempt, redelivered=ctx.redelivered,
                message_id=ctx.message_id, context=ctx.context, lane=ctx.lane, broker=ctx.broker,
                config=dict(ctx.config), log=ctx.log is not None,
            ))
            ctx.publish("side", {"from": event["n"]})

        async def async_handler(event, ctx):
            asyncio.get_running_loop()  # runs on the event loop
            OUT.append((ctx.queue, event))
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: ctx
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:sync_handler", concurrency: 2}}
          side: {{from: side, handler: "{mod}:async_handler"}}
        """
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    import importlib

    module = importlib.import_module(mod)
    assert len(module.SEEN) == 6
    first = module.SEEN[0]
    assert first["thread"].startswith("edarun-handler")
    assert first["queue"] == "work" and first["consumer"] == "worker"
    assert first["attempt"] == 1 and first["redelivered"] is False
    assert first["context"] is None and first["lane"] == "standard"
    assert first["broker"] == redact_url(broker_url) and first["config"] == {} and first["log"]
    assert {s["worker"] for s in module.SEEN} <= {1, 2}
    assert len({s["message_id"] for s in module.SEEN}) == 6
    assert sorted(e["from"] for _, e in module.OUT) == list(range(6))


async def test_csv_and_generator_sources_with_count(  # type: ignore[no-untyped-def]
    factory, run_pipeline
) -> None:
    factory.data("rows.csv", "id,account,shares,price\n1,A-1,100,1.5\n2,B-2,x,2\n3,C-3,300,3\n")
    mod = factory.module(
        "gen",
        """
        SEEN = []

        def numbers(ctx):
            n = 0
            while True:  # endless: the producer's count stops it
                n += 1
                yield {"n": n, "producer": ctx.producer}

        async def agen():
            for n in range(3):
                yield {"n": n}

        def handle(event, ctx):
            SEEN.append(event)
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: sources
        plugins: [plugins]
        producers:
          csv: {{source: file(rows.csv), to: work}}
          gen: {{source: "{mod}:numbers", count: 7, to: work}}
          agen: {{source: "{mod}:agen", to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle"}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert runner.stats.producers["gen"].published == 7
    import importlib

    seen = importlib.import_module(mod).SEEN
    rows = [e for e in seen if "account" in e]
    assert {"id": 1, "account": "A-1", "shares": 100, "price": 1.5} in rows
    assert {"id": 2, "account": "B-2", "shares": "x", "price": 2} in rows
    assert sorted(e["n"] for e in seen if e.get("producer") == "gen") == list(range(1, 8))
    assert len(seen) == 3 + 7 + 3


async def test_bad_source_lines_are_rejected_and_counted(  # type: ignore[no-untyped-def]
    factory, run_pipeline
) -> None:
    factory.data("events.jsonl", '{"n": 1}\nnot json\n[1, 2]\n\n{"n": 2}\n')
    mod = factory.module("ok", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: rejected
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle"}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    assert runner.stats.producers["feed"].published == 2
    assert runner.stats.producers["feed"].rejected == 2


async def test_at_most_once_acks_before_the_handler(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(3)])
    mod = factory.module(
        "amo",
        """
        DEPTHS = []
        BROKER = {}

        async def handle(event, ctx):
            DEPTHS.append(event["n"])
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: amo
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", delivery: at_most_once, prefetch: 1}}
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0 and runner.stats.consumers["worker"].processed == 3


async def test_only_runs_a_subset_and_waits_only_for_it(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": i} for i in range(10)])
    mod = factory.module("only", "def handle(event, ctx):\n    return event\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: only
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: a}}
        consumers:
          first: {{from: a, handler: "{mod}:handle", emit: b}}
          second: {{from: b, handler: "{mod}:handle"}}
        """
    )
    code, runner = await run_pipeline(path, only=["feed", "first"])
    assert code == 0
    assert set(runner.stats.consumers) == {"first"}
    assert runner.stats.consumers["first"].processed == 10
