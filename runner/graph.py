"""The topology of a pipeline as Mermaid or Graphviz dot: producers, queues and their priority
lanes, consumers, emit edges, workflow processors, the dashboard queues where failed events are
parked, flow monitors and their control exchanges, the config service with its watch queues and,
with several brokers (pattern 9), the brokers every queue exists on and the spread."""

from __future__ import annotations

import re
import shutil
import subprocess

from .config.models import Pipeline
from .patterns.priority import lane_queue, lane_rules
from .patterns.watch import config_queue, watch_queue
from .patterns.workflow import workflow_queue
from .redact import redact_url


def _edges(model: Pipeline) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str, str]]]:
    """Nodes (id → (label, kind)) and edges (from, to, label)."""
    nodes: dict[str, tuple[str, str]] = {}
    edges: list[tuple[str, str, str]] = []

    def queue(name: str, kind: str = "queue") -> str:
        node = f"q_{name}"
        nodes.setdefault(node, (name, kind))
        return node

    rules = lane_rules(model)

    def publish(source: str, target: str, label: str = "", marks: str | None = None) -> None:
        """An edge to the queue and, when it has a lane, one to the lane saying what goes there."""
        edges.append((source, queue(target), label))
        rule = rules.get(target)
        if rule is not None:
            whens = [w for w in (rule.when, marks) if w]
            edges.append((source, queue(rule.lane, "lane"), " or ".join(whens) or "marked priority"))

    for name, spec in model.queues.items():
        if spec.flow_control is not None:
            # Pattern 8: the monitor watches the queue and tells its producers over the exchange.
            monitor, control = f"m_{name}", f"x_{name}"
            fc = spec.flow_control
            nodes[monitor] = (f"{name}.flow monitor", "consumer")
            nodes[control] = (f"{name}.control", "exchange")
            edges.append((queue(name), monitor, f"depth every {fc.every:g}s"))
            edges.append((monitor, control, f"slow above {fc.upper}, resume at {fc.resume_at}"))
    for name, producer in model.producers.items():
        node = f"p_{name}"
        nodes[node] = (name, "producer")
        for target in producer.targets:
            control_spec = model.queues.get(target)
            if control_spec is not None and control_spec.flow_control is not None:
                edges.append((f"x_{target}", node, "flow"))
        marks = producer.priority
        if producer.to:
            publish(node, producer.to, marks=marks)
        if producer.route:
            for value, target in producer.route.to.items():
                publish(node, target, f"{producer.route.by}={value}", marks)
            if producer.route.default:
                publish(node, producer.route.default, "default", marks)
    for name, consumer in model.consumers.items():
        node = f"c_{name}"
        nodes[node] = (name, "consumer")
        edges.append((queue(consumer.from_), node, ""))
        lane = consumer.priority_lane
        if lane is not None:
            served = "ambulance" if lane.mode == "ambulance" else f"carpool x{lane.carpool}"
            edges.append((queue(lane_queue(consumer.from_), "lane"), node, f"first ({served})"))
        if consumer.emit:
            publish(node, consumer.emit, "emit")
        if consumer.on_error.action == "workflow":
            # Pattern 7: failures go to the workflow processor, which resubmits or parks them.
            inbox = queue(workflow_queue(name), "workflow")
            processor = f"w_{name}"
            nodes[processor] = (f"{name} workflow: {consumer.on_error.repair}", "consumer")
            edges += [
                (node, inbox, "failed"),
                (inbox, processor, ""),
                (processor, queue(consumer.from_), "repaired"),
            ]
            edges.append((processor, queue(f"{name}.dashboard", "dashboard"), "parked"))
        else:
            edges.append((node, queue(f"{name}.dashboard", "dashboard"), "parked"))
    watching = {name: c.watch for name, c in model.consumers.items() if c.watch}
    if model.config or watching:
        # Pattern 4: commands in, a versioned notice to each watching service's own queue.
        service = "s_config"
        nodes[service] = (f"{config_queue(model.name)} service", "consumer")
        edges.append((queue(config_queue(model.name), "watch"), service, "set / register"))
        for name, keys in watching.items():
            inbox = queue(watch_queue(model.name, name), "watch")
            edges += [(service, inbox, ", ".join(keys) + " (versioned)"), (inbox, f"c_{name}", "ctx.config")]
    return nodes, edges


def _on(model: Pipeline) -> str:
    """Where it runs: the broker, or the brokers and how publishes spread over them."""
    urls = " + ".join(redact_url(url) for url in model.broker_urls)
    return f"{urls} ({_spread(model)})" if _brokers(model) else urls


def _spread(model: Pipeline) -> str:
    spread = model.spread
    how = f"by_context({spread.by})" if spread is not None and spread.by else "round_robin"
    return f"every queue on each broker; spread: {how}"


def _brokers(model: Pipeline) -> list[tuple[str, str]]:
    """(node id, label) of each broker of a multi-broker pipeline; none for one broker."""
    if not model.brokers or len(model.brokers) < 2:
        return []
    return [(f"broker_{index}", redact_url(url)) for index, url in enumerate(model.brokers)]


def _id(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", node)


def mermaid(model: Pipeline) -> str:
    nodes, edges = _edges(model)
    shapes = {
        "producer": ("([", "])"),
        "consumer": ("[", "]"),
        "queue": ("[(", ")]"),
        "lane": ("[(", ")]"),
        "workflow": ("[(", ")]"),
        "dashboard": ("[(", ")]"),
        "watch": ("[(", ")]"),
        "exchange": ("{{", "}}"),
    }
    lines = ["flowchart LR", f"  %% {model.name} on {_on(model)}"]
    brokers = _brokers(model)
    if brokers:
        lines.append(f'  subgraph brokers["{_spread(model)}"]')
        lines += [f'    {node}[("{label}")]' for node, label in brokers]
        lines.append("  end")
    for node, (label, kind) in nodes.items():
        left, right = shapes[kind]
        lines.append(f'  {_id(node)}{left}"{label}"{right}')
    for src, dst, label in edges:
        arrow = f' -- "{label.replace(chr(34), "#quot;")}" --> ' if label else " --> "
        lines.append(f"  {_id(src)}{arrow}{_id(dst)}")
    lines.append("  classDef dashboard fill:#fdd,stroke:#c33")
    lines.append("  classDef lane fill:#ffe9b3,stroke:#c80")
    for kind in ("dashboard", "lane"):
        members = [_id(n) for n, (_, k) in nodes.items() if k == kind]
        if members:
            lines.append(f"  class {','.join(members)} {kind}")
    return "\n".join(lines) + "\n"


def dot(model: Pipeline) -> str:
    nodes, edges = _edges(model)
    shapes = {
        "producer": "oval",
        "consumer": "box",
        "queue": "cylinder",
        "lane": "cylinder",
        "workflow": "cylinder",
        "dashboard": "cylinder",
        "watch": "cylinder",
        "exchange": "hexagon",
    }
    fills = {"dashboard": "#ffdddd", "lane": "#ffe9b3"}
    lines = [
        f'digraph "{model.name}" {{',
        "  rankdir=LR;",
        f'  label="{model.name} on {_on(model)}";',
    ]
    brokers = _brokers(model)
    if brokers:
        lines.append(f'  subgraph cluster_brokers {{ label="{_spread(model)}";')
        lines += [f'    {node} [label="{label}", shape=box3d];' for node, label in brokers]
        lines.append("  }")
    for node, (label, kind) in nodes.items():
        extra = f', style=filled, fillcolor="{fills[kind]}"' if kind in fills else ""
        lines.append(f'  {_id(node)} [label="{label}", shape={shapes[kind]}{extra}];')
    for src, dst, label in edges:
        text = label.replace('"', '\\"')
        lines.append(f"  {_id(src)} -> {_id(dst)}" + (f' [label="{text}"];' if label else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


class GraphvizError(RuntimeError):
    """Graphviz is missing or could not draw the graph."""


def draw(dot_text: str, image_format: str) -> bytes:
    """The dot graph drawn by Graphviz's `dot` as svg or png."""
    program = shutil.which("dot")
    if program is None:
        raise GraphvizError(
            f"--format {image_format} needs Graphviz's `dot` on the PATH (e.g. apt install graphviz); "
            "--format mermaid and dot need nothing"
        )
    try:
        result = subprocess.run(
            [program, f"-T{image_format}"], input=dot_text.encode(), capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GraphvizError(f"Graphviz failed: {exc}") from None
    if result.returncode != 0:
        raise GraphvizError(f"Graphviz failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
