"""Contextual queue (pattern 6): a producer's `route:` sends each event to the queue for its kind.

Heterogeneous events (books, music, movies) get dedicated queues, each with its own consumers and
policies, so a slow kind no longer holds up the others. The value of the `by` field picks the
queue (compared as text, so `42`, `42.0` and `true` match the keys `42` and `true`); a value without a
route goes to `default`, or, with none, fails its publish loudly: counted as rejected and logged
with the value, never dropped in silence.
"""

from __future__ import annotations

from typing import Any

from ..config.models import Route
from ..types import Event, lookup


class NoRoute(ValueError):
    """An event whose value has no route and no default."""


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as YAML writes the keys
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 42.0 from JSON matches the key 42
    return str(value)


class Router:
    def __init__(self, route: Route) -> None:
        self.by = route.by
        self.table = {_text(key): queue for key, queue in route.to.items()}
        self.default = route.default

    def target(self, event: Event) -> str:
        value = lookup(event, self.by)
        queue = self.table.get(_text(value)) if value is not None else None
        if queue is not None:
            return queue
        if self.default is not None:
            return self.default
        known = ", ".join(sorted(self.table))
        raise NoRoute(f"no route for {self.by}={value!r} (routes: {known}; no default)")
