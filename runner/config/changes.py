"""What an edit of a pipeline file changes, and whether running services can take it live.

`edarun up --reload` compares the file it runs with the edited one. A change is live when a running
service can adopt it between two events without losing or reordering any: a consumer's autoscale
numbers, its concurrency, its retry numbers, its priority-lane expression; a producer's rate and
priority mark; a queue's flow-control numbers; a `config:` value. Anything else (a new queue, a
renamed consumer, an ordering field, a broker) changes what exists, not how it behaves: it needs a
restart of the services it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .models import Pipeline

EVERY_SERVICE = "every service"

# Paths (below consumers.<name>, producers.<name>, queues.<name>) whose change is applied live,
# each when the policy it belongs to exists before and after the edit (a policy that appears or goes
# away changes what runs: a supervisor, a monitor, a lane).
_LIVE_CONSUMER: dict[tuple[str, ...], str | None] = {
    ("concurrency",): None,
    ("autoscale", "per"): "autoscale",
    ("autoscale", "max"): "autoscale",
    ("autoscale", "min"): "autoscale",
    ("autoscale", "every"): "autoscale",
    ("autoscale", "keep_alive"): "autoscale",
    ("on_error", "retries"): "on_error",
    ("on_error", "backoff"): "on_error",
    ("on_error", "max_backoff"): "on_error",
    ("priority_lane", "when"): "priority_lane",
}
_LIVE_PRODUCER: dict[tuple[str, ...], str | None] = {("rate",): None, ("priority",): None}
_LIVE_QUEUE: dict[tuple[str, ...], str | None] = {
    ("flow_control", "upper"): "flow_control",
    ("flow_control", "lower"): "flow_control",
    ("flow_control", "delay"): "flow_control",
    ("flow_control", "every"): "flow_control",
}


@dataclass
class Changes:
    live: list[str] = field(default_factory=list)  # "consumers.worker.autoscale.max: 4 → 8"
    config: dict[str, Any] = field(default_factory=dict)  # config values to set
    restart: list[str] = field(default_factory=list)  # what cannot be applied live, said the same way
    services: list[str] = field(default_factory=list)  # the services those need restarted

    @property
    def empty(self) -> bool:
        return not (self.live or self.config or self.restart)

    def needs(self, what: str, services: list[str]) -> None:
        self.restart.append(what)
        self.services += [s for s in services if s not in self.services]


def compare(old: Pipeline, new: Pipeline) -> Changes:
    """Every difference between `old` and `new`, sorted into live and restart."""
    changes = Changes()
    before, after = _dump(old), _dump(new)
    for key in dict.fromkeys([*before, *after]):
        if before.get(key) == after.get(key):
            continue
        if key == "config":
            _config(before.get(key) or {}, after.get(key) or {}, changes)
        elif key in ("consumers", "producers", "queues"):
            _section(key, before.get(key) or {}, after.get(key) or {}, changes, old, new)
        else:
            changes.needs(f"{key} changed", [EVERY_SERVICE])
    return changes


def _dump(model: Pipeline) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


def _config(before: dict[str, Any], after: dict[str, Any], changes: Changes) -> None:
    for key in dict.fromkeys([*before, *after]):
        if key not in after:
            # A value nobody may watch any more (validation sees to that); it stays on the broker.
            changes.live.append(
                f"config.{key}: removed from the file (its value stays with the config service)"
            )
        elif before.get(key) != after[key] or key not in before:
            changes.config[key] = after[key]
            changes.live.append(f"config.{key}: {_show(before.get(key))} → {_show(after[key])}")


def _section(
    section: str,
    before: dict[str, Any],
    after: dict[str, Any],
    changes: Changes,
    old: Pipeline,
    new: Pipeline,
) -> None:
    live: dict[tuple[str, ...], str | None] = {
        "consumers": _LIVE_CONSUMER, "producers": _LIVE_PRODUCER, "queues": _LIVE_QUEUE
    }[section]  # fmt: skip
    for name in dict.fromkeys([*before, *after]):
        where = f"{section}.{name}"
        if name not in before or name not in after:
            what = "added" if name not in before else "removed"
            changes.needs(f"{where} {what}", _affected(section, name, old, new))
            continue
        for path, old_value, new_value in _differences(before[name], after[name]):
            policy = live.get(path, "-")
            applies = policy is None or (
                policy != "-" and before[name].get(policy) is not None and after[name].get(policy) is not None
            )
            text = f"{where}.{'.'.join(path)}: {_show(old_value)} → {_show(new_value)}"
            if applies:
                changes.live.append(text)
            else:
                changes.needs(text, _affected(section, name, old, new))


def _differences(
    before: Any, after: Any, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Any, Any]]:
    """The leaf paths where two dumped models differ; a policy that appears or goes away is one
    difference at its own path."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in dict.fromkeys([*before, *after]):
            if before.get(key) != after.get(key):
                found += _differences(before.get(key), after.get(key), (*path, key))
        return found
    return [(path, before, after)]


def _affected(section: str, name: str, old: Pipeline, new: Pipeline) -> list[str]:
    """The services a structural change of `section.name` restarts."""
    if section != "queues":
        return [name]
    services = []
    for model in (old, new):
        services += [c for c, spec in model.consumers.items() if spec.from_ == name or spec.emit == name]
        services += [p for p, spec in model.producers.items() if name in spec.targets]
    return list(dict.fromkeys(services)) or [f"{name}.flow"]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
