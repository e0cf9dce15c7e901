"""Traces of a run: a retried event stays one trace, and failures are visible on their spans."""

from __future__ import annotations

from runner.traces_view import load_traces


async def test_retried_then_parked_event_is_one_trace_with_failed_spans(  # type: ignore[no-untyped-def]
    factory, jsonl, tmp_path, run_pipeline
) -> None:
    jsonl("events.jsonl", [{"n": 1}, {"n": 2}])
    mod = factory.module(
        "fails",
        """
        def handle(event, ctx):
            if event["n"] == 2:
                raise ValueError("two is bad")
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: traced
        plugins: [plugins]
        telemetry: {{traces: file(traces.jsonl)}}
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker:
            from: work
            handler: "{mod}:handle"
            on_error: {{action: retry, retries: 1, backoff: 1ms}}
        """
    )
    code, _ = await run_pipeline(path)
    assert code == 0
    traces = load_traces(tmp_path / "traces.jsonl")
    assert len(traces) == 2
    failing = next(spans for spans in traces.values() if len(spans) > 2)
    consumes = sorted((s for s in failing if s["kind"] == 5), key=lambda s: s["startTimeUnixNano"])
    assert [s["attributes"]["edarun.attempt"] for s in consumes] == [1, 2]
    assert [s["attributes"]["edarun.workflow.action"] for s in consumes] == ["retry", "park"]
    assert all(s["status"].get("code") == 2 for s in consumes)  # ERROR
    # The retry's publish is a child of the failed attempt: the journey is one trace.
    by_id = {s["spanId"]: s for s in failing}
    retry_publish = by_id[consumes[1]["parentSpanId"]]
    assert retry_publish["kind"] == 4 and by_id[retry_publish["parentSpanId"]] is consumes[0]
    parking = next(s for s in failing if s["name"] == "send worker.dashboard")
    assert by_id[parking["parentSpanId"]] is consumes[1]
