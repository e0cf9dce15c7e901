"""Span shape, propagation, exporters and the trace viewer (SPEC §6)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from rich.console import Console

from runner.telemetry import Tracing
from runner.traces_view import SpanRecord, load_traces, render_traces

PRODUCER, CONSUMER = 4, 5  # OTLP span kinds
MESSAGING_ATTRIBUTES = {
    "messaging.system",
    "messaging.destination.name",
    "messaging.operation.type",
    "messaging.operation.name",
    "messaging.message.id",
}


async def _two_stage_flow(tracing: Tracing, events: int) -> None:
    """A source publishes to "a"; its consumer publishes to "b"; b's consumer ends the flow."""

    async def one(n: int) -> None:
        headers_a: dict[str, str] = {}
        with tracing.publish_span("a", message_id=f"a-{n}", headers=headers_a, system="memory", root=True):
            await asyncio.sleep(0)
        with tracing.consume_span(
            "a",
            message_id=f"a-{n}",
            headers=headers_a,
            system="memory",
            attributes={"edarun.context": f"ctx-{n}", "edarun.broker": "amqp://u:secret@h/"},
        ):
            await asyncio.sleep(0)
            headers_b: dict[str, str] = {}
            with tracing.publish_span("b", message_id=f"b-{n}", headers=headers_b, system="memory"):
                await asyncio.sleep(0)
        # Brokers may hand headers back as bytes.
        raw = {key: value.encode() for key, value in headers_b.items()}
        with tracing.consume_span("b", message_id=f"b-{n}", headers=raw, system="memory"):
            tracing.event("edarun.done", {"n": n})
            await asyncio.sleep(0)

    # Concurrent tasks: each must keep its own current span.
    await asyncio.gather(*(one(n) for n in range(events)))


@pytest.fixture
async def traced_file(tmp_path: Path) -> Path:
    path = tmp_path / "traces.jsonl"
    tracing = Tracing.setup("file", path=path)
    await _two_stage_flow(tracing, 20)
    tracing.shutdown()
    return path


def _all_spans(path: Path) -> list[SpanRecord]:
    return [span for spans in load_traces(path).values() for span in spans]


def test_file_traces_follow_the_flow(traced_file: Path) -> None:
    traces = load_traces(traced_file)
    assert len(traces) == 20
    for spans in traces.values():
        by_name = {span["name"]: span for span in spans}
        assert sorted(by_name) == ["process a", "process b", "send a", "send b"]
        assert [span["kind"] for span in spans].count(PRODUCER) == 2
        assert [span["kind"] for span in spans].count(CONSUMER) == 2
        assert by_name["send a"]["parentSpanId"] == ""
        assert by_name["process a"]["parentSpanId"] == by_name["send a"]["spanId"]
        assert by_name["send b"]["parentSpanId"] == by_name["process a"]["spanId"]
        assert by_name["process b"]["parentSpanId"] == by_name["send b"]["spanId"]
        assert by_name["process a"]["attributes"]["messaging.operation.type"] == "process"
        assert by_name["send a"]["attributes"]["messaging.operation.type"] == "send"
        assert by_name["send b"]["attributes"]["messaging.destination.name"] == "b"


def test_file_lines_are_otlp_json_requests(traced_file: Path) -> None:
    lines = [line for line in traced_file.read_text().splitlines() if line]
    assert lines
    for line in lines:
        document = json.loads(line)
        for resource_spans in document["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    assert len(span["traceId"]) == 32
                    assert len(span["spanId"]) == 16
                    int(span["traceId"], 16), int(span["spanId"], 16)
                    assert span["traceId"] == span["traceId"].lower()
                    assert isinstance(span["kind"], int)
                    for field in ("traceId", "spanId", "parentSpanId"):
                        if field in span:
                            span[field] = base64.b64encode(bytes.fromhex(span[field])).decode()
        # The protobuf JSON mapping takes ids as base64; once converted back, the line must parse.
        request = json_format.Parse(json.dumps(document), ExportTraceServiceRequest())
        assert request.resource_spans[0].scope_spans[0].spans


def test_messaging_attribute_names(traced_file: Path) -> None:
    names = {
        key for span in _all_spans(traced_file) for key in span["attributes"] if key.startswith("messaging.")
    }
    assert names == MESSAGING_ATTRIBUTES


def test_credentials_are_redacted(traced_file: Path) -> None:
    text = traced_file.read_text()
    assert "secret" not in text
    assert "amqp://u:***@h/" in text


def test_events_and_errors_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    tracing = Tracing.setup("file", path=path)
    headers: dict[str, str] = {}
    with tracing.publish_span("q", message_id="1", headers=headers, system="memory", root=True):
        pass
    with (
        pytest.raises(RuntimeError),
        tracing.consume_span("q", message_id="1", headers=headers, system="memory"),
    ):
        tracing.event("edarun.retry", {"edarun.attempt": 2})
        raise RuntimeError("handler failed")
    tracing.shutdown()
    line = json.loads(path.read_text().splitlines()[0])
    spans = {s["name"]: s for s in line["resourceSpans"][0]["scopeSpans"][0]["spans"]}
    consumer = spans["process q"]
    assert consumer["status"]["code"] == 2
    assert {event["name"] for event in consumer["events"]} == {"edarun.retry", "exception"}


def test_tracing_never_sets_the_global_provider(tmp_path: Path) -> None:
    before = trace.get_tracer_provider()
    tracing = Tracing.setup("file", path=tmp_path / "t.jsonl")
    assert trace.get_tracer_provider() is before
    tracing.shutdown()


def test_disabled_tracing_is_a_no_op() -> None:
    tracing = Tracing.setup("none")
    assert not tracing.enabled
    headers: dict[str, str] = {}
    with tracing.publish_span("a", message_id="1", headers=headers, system="memory", root=True) as span:
        assert span is None
    with tracing.consume_span("a", message_id="1", headers=headers, system="memory") as span:
        assert span is None
        tracing.event("nothing")
    assert headers == {}
    tracing.shutdown()


def test_shutdown_is_idempotent_and_stops_tracing(tmp_path: Path) -> None:
    tracing = Tracing.setup("file", path=tmp_path / "t.jsonl")
    tracing.shutdown()
    tracing.shutdown()
    assert not tracing.enabled


def test_console_traces_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    tracing = Tracing.setup("console")
    headers: dict[str, str] = {}
    with tracing.publish_span("orders", message_id="7", headers=headers, system="memory", root=True):
        pass
    tracing.shutdown()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "send orders [producer]" in captured.err


def test_unknown_traces_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown traces setting"):
        Tracing.setup("jaeger")


@pytest.fixture
def collector() -> Iterator[tuple[str, list[str]]]:
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    received.extend(span.name for span in scope_spans.spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", received
    server.shutdown()
    server.server_close()


async def test_otlp_http_export(collector: tuple[str, list[str]]) -> None:
    endpoint, received = collector
    tracing = Tracing.setup("otlp", endpoint=endpoint)
    await _two_stage_flow(tracing, 3)
    tracing.shutdown()
    assert sorted(received) == sorted(["send a", "process a", "send b", "process b"] * 3)


def test_shutdown_with_collector_down_returns_promptly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracing = Tracing.setup("otlp", endpoint=f"http://127.0.0.1:{port}")
    for n in range(50):
        with tracing.publish_span("a", message_id=str(n), headers={}, system="memory", root=True):
            pass
    started = time.monotonic()
    tracing.shutdown()
    assert time.monotonic() - started < 8


def test_render_traces_prints_trees(traced_file: Path) -> None:
    console = Console(record=True, width=200)
    assert render_traces(traced_file, console) == 20
    text = console.export_text()
    assert "send a" in text and "process b" in text
    assert "queue=a" in text and "queue=b" in text
    assert "[producer]" in text and "[consumer]" in text
    assert "secret" not in text


def test_load_traces_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('\n{"resourceSpans": []}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not JSON"):
        load_traces(path)
    path.write_text('{"spans": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not an OTLP-JSON"):
        load_traces(path)
    with pytest.raises(ValueError, match="no such file"):
        load_traces(tmp_path / "missing.jsonl")
