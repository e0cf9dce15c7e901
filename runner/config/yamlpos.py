"""YAML reading that keeps the line and column of every key and value, refuses duplicate keys,
and interpolates `${VAR}` / `${VAR:-default}` from the environment in string values."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Loc = tuple[str | int, ...]
MAX_VALUES = 100_000  # a pipeline is far smaller; aliases of aliases could expand without end
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Position:
    line: int
    column: int


@dataclass
class Document:
    """The plain data of a YAML file plus where each piece of it was written."""

    data: Any
    keys: dict[Loc, Position] = field(default_factory=dict)
    values: dict[Loc, Position] = field(default_factory=dict)
    problems: list[tuple[Loc, Position, str]] = field(default_factory=list)

    def position(self, loc: Loc, *, of_key: bool = False) -> Position:
        """The position of `loc`, or of its nearest ancestor that was written in the file."""
        table = (self.keys, self.values) if of_key else (self.values, self.keys)
        while True:
            for marks in table:
                if loc in marks:
                    return marks[loc]
            if not loc:
                return Position(1, 1)
            loc = loc[:-1]


class YamlSyntaxError(ValueError):
    def __init__(self, position: Position, message: str) -> None:
        super().__init__(message)
        self.position = position


def _mark(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`. Returns (text, unset)."""
    unset: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        unset.append(name)
        return ""

    return _VAR.sub(sub, text), unset


def read_yaml(text: str, env: Mapping[str, str] | None = None) -> Document:
    """Parse `text`; raises YamlSyntaxError on a YAML error (tabs in indentation included)."""
    env = os.environ if env is None else env
    loader = yaml.SafeLoader(text)
    doc = Document(data=None)
    try:
        root = loader.get_single_node()
        if root is not None:
            doc.values[()] = _mark(root)
            doc.data = _Builder(doc, loader, env).build(root, ())
    except yaml.MarkedYAMLError as exc:  # syntax, and tags SafeLoader refuses (`!!python/…`)
        mark = exc.problem_mark or exc.context_mark
        position = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        problem = exc.problem or "invalid YAML"
        if "\t" in problem or "'\\t'" in problem:
            problem = "found a tab character; indent with spaces"
        raise YamlSyntaxError(position, f"YAML syntax error: {problem}") from None
    except RecursionError:
        raise YamlSyntaxError(Position(1, 1), "YAML error: nested too deep") from None
    finally:
        loader.dispose()
    return doc


class _Builder:
    """Turns the node tree into plain data, recording positions; refuses alias bombs and cycles."""

    def __init__(self, doc: Document, loader: yaml.SafeLoader, env: Mapping[str, str]) -> None:
        self.doc, self.loader, self.env = doc, loader, env
        self.count = 0
        self.open: set[int] = set()  # the collection nodes being built: one seen again is a cycle

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise YamlSyntaxError(
                _mark(node), f"YAML error: more than {MAX_VALUES} values (aliases nested too deep?)"
            )
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return _scalar(node, loc, self.doc, self.loader, self.env)
        if id(node) in self.open:
            raise YamlSyntaxError(_mark(node), "YAML error: an alias refers to its own anchor")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            return self._sequence(node, loc)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        doc, loader = self.doc, self.loader
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str | int | float | bool) or key_node.tag == "tag:yaml.org,2002:merge":
                doc.problems.append((loc, _mark(key_node), "expected a plain key"))
                continue
            # Keys are text, written as YAML writes them: `true`, not Python's `True`.
            key = ("true" if key else "false") if isinstance(key, bool) else str(key)
            child = (*loc, key)
            if key in result:
                first = doc.keys[child]
                doc.problems.append(
                    (child, _mark(key_node), f"duplicate key {key!r} (first at line {first.line})")
                )
                continue
            doc.keys[child] = _mark(key_node)
            doc.values[child] = _mark(value_node)
            result[key] = self.build(value_node, child)
        return result

    def _sequence(self, node: yaml.SequenceNode, loc: Loc) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.doc.values[(*loc, index)] = _mark(item)
            items.append(self.build(item, (*loc, index)))
        return items


def _scalar(node: yaml.Node, loc: Loc, doc: Document, loader: yaml.SafeLoader, env: Mapping[str, str]) -> Any:
    value = loader.construct_object(node)
    if isinstance(value, str) and "$" in value:
        value, unset = interpolate(value, env)
        for name in unset:
            doc.problems.append(
                (
                    loc,
                    _mark(node),
                    f"environment variable {name} is not set (use ${{{name}:-default}})",
                )
            )
        if node.style is None and value != node.value:
            # An unquoted `${N}` reads as YAML would read the value written in its place.
            resolved = loader.resolve(yaml.ScalarNode, value, (True, False))
            if resolved != "tag:yaml.org,2002:str":
                value = loader.construct_object(yaml.ScalarNode(resolved, value))
    return value
