"""The topology of a pipeline as Mermaid or Graphviz dot: producers, queues, consumers, emit edges
and the dashboard queues where failed events are parked."""

from __future__ import annotations

import re

from .config.models import Pipeline
from .redact import redact_url


def _edges(model: Pipeline) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str]]]:
    """Nodes (id → (label, kind)) and edges (from, to, label)."""
    nodes: dict[str, tuple[str, str]] = {}
    edges: list[tuple[str, str, str]] = []

    def queue(name: str, kind: str = "queue") -> str:
        node = f"q_{name}"
        nodes.setdefault(node, (name, kind))
        return node

    for name, producer in model.producers.items():
        node = f"p_{name}"
        nodes[node] = (name, "producer")
        if producer.to:
            edges.append((node, queue(producer.to), ""))
        if producer.route:
            for value, target in producer.route.to.items():
                edges.append((node, queue(target), f"{producer.route.by}={value}"))
            if producer.route.default:
                edges.append((node, queue(producer.route.default), "default"))
    for name, consumer in model.consumers.items():
        node = f"c_{name}"
        nodes[node] = (name, "consumer")
        edges.append((queue(consumer.from_), node, ""))
        if consumer.emit:
            edges.append((node, queue(consumer.emit), "emit"))
        edges.append((node, queue(f"{name}.dashboard", "dashboard"), "parked"))
    return nodes, edges


def _id(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", node)


def mermaid(model: Pipeline) -> str:
    nodes, edges = _edges(model)
    shapes = {
        "producer": ("([", "])"),
        "consumer": ("[", "]"),
        "queue": ("[(", ")]"),
        "dashboard": ("[(", ")]"),
    }
    lines = ["flowchart LR", f"  %% {model.name} on {redact_url(model.broker)}"]
    for node, (label, kind) in nodes.items():
        left, right = shapes[kind]
        lines.append(f'  {_id(node)}{left}"{label}"{right}')
    for src, dst, label in edges:
        arrow = f" -- {label} --> " if label else " --> "
        lines.append(f"  {_id(src)}{arrow}{_id(dst)}")
    lines.append("  classDef dashboard fill:#fdd,stroke:#c33")
    dash = [_id(n) for n, (_, kind) in nodes.items() if kind == "dashboard"]
    if dash:
        lines.append(f"  class {','.join(dash)} dashboard")
    return "\n".join(lines) + "\n"


def dot(model: Pipeline) -> str:
    nodes, edges = _edges(model)
    shapes = {"producer": "oval", "consumer": "box", "queue": "cylinder", "dashboard": "cylinder"}
    lines = [
        f'digraph "{model.name}" {{',
        "  rankdir=LR;",
        f'  label="{model.name} on {redact_url(model.broker)}";',
    ]
    for node, (label, kind) in nodes.items():
        extra = ', style=filled, fillcolor="#ffdddd"' if kind == "dashboard" else ""
        lines.append(f'  {_id(node)} [label="{label}", shape={shapes[kind]}{extra}];')
    for src, dst, label in edges:
        lines.append(f"  {_id(src)} -> {_id(dst)}" + (f' [label="{label}"];' if label else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"
