"""Where finished spans go: OTLP/HTTP, an OTLP-JSON lines file or the console, each behind a
shutdown deadline."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult

_log = logging.getLogger(__name__)

# One export (retries included) may take this long; shutdown's budget is a little larger so the
# batch in flight when shutdown starts can still finish against a live collector.
EXPORT_TIMEOUT_S = 4.0


def make_exporter(traces: str, *, path: Path | None, endpoint: str) -> SpanExporter:
    """Build the exporter for one `traces` setting other than "none"."""
    if traces == "otlp":
        return OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=EXPORT_TIMEOUT_S)
    if traces == "file":
        if path is None:
            raise ValueError('traces "file" needs a path')
        return OtlpJsonFileExporter(path)
    if traces == "console":
        # stderr, so spans never interleave with what a command prints on stdout (JSON, tables).
        return ConsoleSpanExporter(out=sys.stderr, formatter=console_line)
    raise ValueError(f"unknown traces setting {traces!r}: expected none, console, otlp or file")


def _any_value(value: object) -> dict[str, object]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # int64 is a string in OTLP-JSON
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _attributes(attributes: Mapping[str, object] | None) -> list[dict[str, object]]:
    return [{"key": key, "value": _any_value(value)} for key, value in (attributes or {}).items()]


def _span(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    record: dict[str, object] = {
        "traceId": f"{context.trace_id:032x}" if context else "",
        "spanId": f"{context.span_id:016x}" if context else "",
        "name": span.name,
        "kind": span.kind.value + 1,  # the SDK's enum starts at INTERNAL=0, OTLP's at UNSPECIFIED=0
        "startTimeUnixNano": str(span.start_time or 0),
        "endTimeUnixNano": str(span.end_time or 0),
        "attributes": _attributes(span.attributes),
        "status": {"code": span.status.status_code.value},
    }
    if span.parent is not None:
        record["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.status.description:
        record["status"] = {"code": span.status.status_code.value, "message": span.status.description}
    if span.events:
        record["events"] = [
            {"timeUnixNano": str(e.timestamp), "name": e.name, "attributes": _attributes(e.attributes)}
            for e in span.events
        ]
    if span.links:
        record["links"] = [
            {
                "traceId": f"{link.context.trace_id:032x}",
                "spanId": f"{link.context.span_id:016x}",
                "attributes": _attributes(link.attributes),
            }
            for link in span.links
        ]
    return record


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, object]:
    """Spans as an OTLP-JSON ExportTraceServiceRequest (ids as lowercase hex, enums as ints).

    Built directly rather than through protobuf's JSON mapping, which is several times slower
    and would make a traced pipeline drop spans under load.
    """
    grouped: dict[tuple[int, int], tuple[ReadableSpan, dict[str, list[dict[str, object]]]]] = {}
    for span in spans:
        resource_key = (id(span.resource), 0)
        _, scopes = grouped.setdefault(resource_key, (span, {}))
        scope = span.instrumentation_scope
        scopes.setdefault(scope.name if scope else "", []).append(_span(span))
    resource_spans = []
    for first, scopes in grouped.values():
        resource_spans.append(
            {
                "resource": {"attributes": _attributes(first.resource.attributes)},
                "scopeSpans": [
                    {"scope": {"name": name}, "spans": records} for name, records in scopes.items()
                ],
            }
        )
    return {"resourceSpans": resource_spans}


class OtlpJsonFileExporter(SpanExporter):
    """Appends one OTLP-JSON ExportTraceServiceRequest line per export batch to a file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fail at setup, not on the first batch, when the file cannot be written.
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = orjson.dumps(otlp_json(spans)) + b"\n"
        try:
            # O_APPEND and one write per line: services in several processes may share the file,
            # and each line must stay whole.
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as error:
            _log.error("cannot write traces to %s: %s", self._path, error)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class DeadlineExporter(SpanExporter):
    """Wraps an exporter so that, once shutdown has begun, batches past the deadline are dropped.

    Without it, a collector that is down would hold shutdown for one full retry cycle per batch.
    """

    def __init__(self, inner: SpanExporter) -> None:
        self._inner = inner
        self._deadline: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        deadline = self._deadline
        if self._closed or (deadline is not None and time.monotonic() >= deadline):
            return SpanExportResult.FAILURE
        return self._inner.export(spans)

    def stop_by(self, deadline: float) -> None:
        """Drop every batch that would start exporting after `deadline` (time.monotonic)."""
        self._deadline = deadline

    def shutdown(self) -> None:
        # Called by the batch processor and, when its join times out, by Tracing.shutdown.
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def console_line(span: ReadableSpan) -> str:
    """One line per span for `traces: console`: enough to follow a trace by eye."""
    context = span.get_span_context()
    trace_id = f"{context.trace_id:032x}" if context else "-"
    span_id = f"{context.span_id:016x}" if context else "-"
    parent = f"{span.parent.span_id:016x}" if span.parent else "-"
    duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    kind = span.kind.name.lower()
    attrs = " ".join(f"{key}={value!s}" for key, value in (span.attributes or {}).items())
    status = "" if span.status.is_ok else f" {span.status.status_code.name}"
    return (
        f"{span.name} [{kind}]{status} {duration_ms:.2f}ms "
        f"trace={trace_id} span={span_id} parent={parent} {attrs}\n"
    )
