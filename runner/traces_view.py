"""`edarun traces PATH`: reads an OTLP-JSON lines file and prints each trace as a tree."""

from __future__ import annotations

import base64
import binascii
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from runner.redact import redact_text

# OTLP span kinds, as the integers OTLP-JSON uses.
_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_KIND_STYLES = {"producer": "cyan", "consumer": "green"}
_STATUS_ERROR = 2

# A span as load_traces returns it: OTLP-JSON field names, attributes flattened.
SpanRecord = dict[str, Any]


def load_traces(path: Path) -> dict[str, list[SpanRecord]]:
    """traceId -> its spans, traces and spans in start order.

    Each span is a dict with traceId, spanId, parentSpanId ("" for a root), name, kind (int),
    startTimeUnixNano, endTimeUnixNano (ints), attributes (a flat dict), status and service.
    Raises ValueError("path:LINE: what") for a missing file or a line that is not a request.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from None
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            for span in _spans_of(json.loads(line)):
                traces[str(span["traceId"])].append(span)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON: {error.msg}") from None
        except (TypeError, KeyError, ValueError, AttributeError) as error:
            raise ValueError(
                f"{path}:{number}: not an OTLP-JSON ExportTraceServiceRequest ({error})"
            ) from None
    for spans in traces.values():
        spans.sort(key=_start)
    return dict(sorted(traces.items(), key=lambda item: _start(item[1][0])))


def render_traces(path: Path, console: Console) -> int:
    """Print every trace in `path` as a tree; return how many traces there were."""
    traces = load_traces(path)
    if not traces:
        console.print(Text(f"no spans in {path}", style="dim"))
    for trace_id, spans in traces.items():
        console.print(_trace_tree(trace_id, spans))
    return len(traces)


def _spans_of(request: object) -> list[SpanRecord]:
    if not isinstance(request, dict) or not isinstance(request.get("resourceSpans"), list):
        raise ValueError("no resourceSpans")
    spans = []
    for resource_spans in request["resourceSpans"]:
        resource = _flat_attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for raw in scope_spans.get("spans", []):
                spans.append(
                    {
                        "traceId": _hex_id(raw["traceId"]),
                        "spanId": _hex_id(raw["spanId"]),
                        "parentSpanId": _hex_id(raw.get("parentSpanId", "")),
                        "name": str(raw.get("name", "")),
                        "kind": _kind(raw.get("kind", 0)),
                        "startTimeUnixNano": int(raw.get("startTimeUnixNano", 0)),
                        "endTimeUnixNano": int(raw.get("endTimeUnixNano", 0)),
                        "attributes": _flat_attributes(raw.get("attributes", [])),
                        "status": raw.get("status", {}),
                        "service": resource.get("service.name", ""),
                    }
                )
    return spans


def _hex_id(value: str) -> str:
    # edarun writes hex as OTLP-JSON requires; plain protobuf JSON (base64) is accepted too.
    if not value or all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    try:
        return base64.b64decode(value, validate=True).hex()
    except binascii.Error:
        raise ValueError(f"bad span id {value!r}") from None


def _kind(value: Any) -> int:
    if isinstance(value, str) and not value.isdigit():
        names = {f"SPAN_KIND_{name.upper()}": number for number, name in _KINDS.items()}
        return names[value]
    return int(value)


def _flat_attributes(attributes: list[SpanRecord]) -> SpanRecord:
    return {str(item["key"]): _any_value(item.get("value", {})) for item in attributes}


def _any_value(value: object) -> object:
    if not isinstance(value, dict) or not value:
        return None
    kind, inner = next(iter(value.items()))
    if kind == "intValue":
        return int(inner)
    if kind == "doubleValue":
        return float(inner)
    if kind == "arrayValue":
        return [_any_value(item) for item in inner.get("values", [])]
    if kind == "kvlistValue":
        return _flat_attributes(inner.get("values", []))
    return inner


def _start(span: SpanRecord) -> int:
    return int(span["startTimeUnixNano"])


def _trace_tree(trace_id: str, spans: list[SpanRecord]) -> Tree:
    trace_start = _start(spans[0])
    trace_end = max(int(span["endTimeUnixNano"]) for span in spans)
    tree = Tree(
        Text.assemble(
            ("trace ", "bold"),
            (trace_id, "bold magenta"),
            f"  {len(spans)} spans  {(trace_end - trace_start) / 1e6:.1f} ms",
        )
    )
    ids = {span["spanId"] for span in spans}
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    roots = []
    for span in spans:
        # A parent missing from the file (another process's file, a lost batch) makes a root.
        if span["parentSpanId"] and span["parentSpanId"] in ids:
            children[span["parentSpanId"]].append(span)
        else:
            roots.append(span)
    seen: set[str] = set()

    def add(node: Tree, span: SpanRecord) -> None:
        if span["spanId"] in seen:  # a corrupt file can name a cycle
            return
        seen.add(span["spanId"])
        branch = node.add(_label(span, trace_start))
        for child in children.get(span["spanId"], []):
            add(branch, child)

    for root in roots:
        add(tree, root)
    return tree


def _label(span: SpanRecord, trace_start: int) -> Text:
    kind = _KINDS.get(span["kind"], str(span["kind"]))
    start = _start(span)
    duration_ms = (int(span["endTimeUnixNano"]) - start) / 1e6
    label = Text.assemble(
        (str(span["name"]), "bold"),
        "  ",
        (f"[{kind}]", _KIND_STYLES.get(kind, "")),
        f"  +{(start - trace_start) / 1e6:.1f}ms  {duration_ms:.2f}ms",
    )
    attributes = span["attributes"]
    assert isinstance(attributes, dict)
    shown = []
    if "messaging.destination.name" in attributes:
        shown.append(f"queue={attributes['messaging.destination.name']}")
    shown += [
        f"{key.removeprefix('edarun.')}={value}"
        for key, value in attributes.items()
        if key.startswith("edarun.")
    ]
    if shown:
        text = " ".join(shown)
        label.append("  " + (redact_text(text) if "@" in text else text), style="dim")
    status = span["status"]
    if isinstance(status, dict) and status.get("code") in (_STATUS_ERROR, "STATUS_CODE_ERROR"):
        label.append(f"  ERROR {status.get('message', '')}".rstrip(), style="bold red")
    return label
