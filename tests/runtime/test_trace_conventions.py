"""Span names, kinds and attribute names follow the OpenTelemetry messaging conventions, and every
`edarun.*` attribute a run writes is documented in docs/tracing.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from runner.traces_view import load_traces

ROOT = Path(__file__).resolve().parents[2]
PRODUCER, CONSUMER, INTERNAL = 4, 5, 1  # OTLP SpanKind numbers
MESSAGING = {
    "messaging.system", "messaging.destination.name", "messaging.operation.type",
    "messaging.operation.name", "messaging.message.id",
}  # fmt: skip
DECISIONS = re.compile(r"^(autoscale \S+|flow \S+|config set \S+|config \S+)$")


def documented() -> set[str]:
    return set(re.findall(r"`(edarun\.[a-z_.]+)`", (ROOT / "docs" / "tracing.md").read_text()))


async def test_the_showcase_follows_the_conventions(
    tmp_path: Path, run_pipeline: Any, broker_url: str
) -> None:
    # The showcase uses patterns 1-5, 7 and 8 at once; a copy, so its queues are this test's own.
    folder = tmp_path / "pipelines"
    shutil.copytree(ROOT / "pipelines" / "data", folder / "data")
    name = f"conventions-{tmp_path.name[-12:]}".lower().replace("_", "-")
    text = (ROOT / "pipelines" / "trading.yaml").read_text()
    text = text.replace("name: trading", f"name: {name}").replace("[../plugins]", f"[{ROOT / 'plugins'}]")
    for queue in ("trades", "confirmations"):
        text = re.sub(rf"\b{queue}\b(?![-.])", f"{name}-{queue}", text)
    path = folder / "trading.yaml"
    path.write_text(text)
    traces = tmp_path / "traces.jsonl"
    code, _ = await run_pipeline(path, traces=f"file({traces})")
    assert code == 0
    spans = [span for trace in load_traces(traces).values() for span in trace]
    assert spans
    allowed = MESSAGING | documented()
    seen: set[str] = set()
    for span in spans:
        attributes = span["attributes"]
        seen |= set(attributes)
        kind = span.get("kind")
        if kind in (PRODUCER, CONSUMER):
            operation = "send" if kind == PRODUCER else "process"
            queue = attributes["messaging.destination.name"]
            assert span["name"] == f"{operation} {queue}"  # {operation} {destination}
            assert attributes["messaging.operation.type"] == operation
            assert set(MESSAGING) <= set(attributes)
        else:
            assert kind == INTERNAL and DECISIONS.match(span["name"]), span["name"]
    assert seen <= allowed, seen - allowed
    # The patterns this pipeline uses show in its spans.
    for attribute in ("edarun.context", "edarun.lane", "edarun.workflow.action", "edarun.attempt",
                      "edarun.autoscale.to", "edarun.config.key"):  # fmt: skip
        assert attribute in seen, attribute
