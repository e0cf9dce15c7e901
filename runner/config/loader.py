"""Loading a pipeline file: YAML → models → cross-checks, every error as `file:line:col: key: what`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import refs
from .models import Pipeline
from .yamlpos import Document, Loc, Position, YamlSyntaxError, read_yaml


class PipelineError(Exception):
    """An invalid pipeline; `lines` holds every error, one per line, ready to print."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class LoadedPipeline:
    """A valid pipeline with the places it refers to resolved."""

    model: Pipeline
    path: Path
    base_dir: Path
    plugin_dirs: tuple[Path, ...]

    def resolve(self, ref: str) -> Any:
        return refs.resolve(ref, self.plugin_dirs)

    def file(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve()


def _key_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


def _known_keys() -> set[str]:
    names: set[str] = set()
    pending: list[Any] = [Pipeline]
    while pending:
        model = pending.pop()
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
            for arg in getattr(info.annotation, "__args__", ()) + (info.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields") and arg not in pending:
                    pending.append(arg)
    return names


class _Errors:
    def __init__(self, path: Path, doc: Document | None) -> None:
        self.path, self.doc = path, doc
        self.found: list[tuple[int, int, str]] = []

    @property
    def lines(self) -> list[str]:
        return [line for _, _, line in sorted(self.found, key=lambda f: (f[0], f[1]))]

    def add(
        self, loc: Loc, message: str, *, of_key: bool = False, at: Position | None = None
    ) -> None:
        pos = at or (self.doc.position(loc, of_key=of_key) if self.doc else Position(1, 1))
        line = f"{self.path}:{pos.line}:{pos.column}: {_key_path(loc)}: {message}"
        if all(line != seen for _, _, seen in self.found):
            self.found.append((pos.line, pos.column, line))


def _pydantic_message(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        known = _known_keys()
        if key in known:
            return f"unknown key {key!r} here"
        close = difflib.get_close_matches(key, sorted(known), n=1)
        return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch" and error["loc"] and "handler" in error["loc"]:
        return "expected 'module:function'"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def load_pipeline(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_refs: bool = True
) -> LoadedPipeline:
    """Read and validate a pipeline file; raises PipelineError listing every problem."""
    path = Path(path)
    errors = _Errors(path, None)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError([f"{path}: cannot read: {exc}"]) from None
    try:
        doc = read_yaml(text, os.environ if env is None else env)
    except YamlSyntaxError as exc:
        raise PipelineError([f"{path}:{exc.position.line}:{exc.position.column}: {exc}"]) from None
    errors.doc = doc
    if doc.data is None:
        raise PipelineError([f"{path}:1:1: (top): the file is empty; expected a pipeline mapping"])
    if not isinstance(doc.data, dict):
        errors.add((), "expected a mapping with version, name, producers and consumers")
        raise PipelineError(errors.lines)
    for loc, pos, message in doc.problems:
        errors.add(loc, message, at=pos)
    try:
        model = Pipeline.model_validate(doc.data)
        if doc.problems:
            raise PipelineError(errors.lines)
    except ValidationError as exc:
        reported = [loc for loc, _, _ in doc.problems]
        for error in exc.errors():
            loc = tuple(error["loc"])
            if error["type"] != "extra_forbidden" and any(loc[: len(r)] == r for r in reported):
                continue  # already explained by the YAML problem at that place
            errors.add(loc, _pydantic_message(error), of_key=error["type"] == "extra_forbidden")
        raise PipelineError(errors.lines) from None
    base_dir = path.resolve().parent
    loaded = LoadedPipeline(
        model=model,
        path=path,
        base_dir=base_dir,
        plugin_dirs=tuple((base_dir / p).resolve() for p in model.plugins),
    )
    from .checks import check_pipeline  # the checks import the plugins: only for a valid model

    for loc, message in check_pipeline(loaded, doc.data, check_refs=check_refs):
        errors.add(loc, message)
    if errors.lines:
        raise PipelineError(errors.lines)
    return loaded
