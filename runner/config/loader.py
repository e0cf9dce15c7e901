"""Loading a pipeline file: YAML → models → checks, every error as `file:line:col: key: what`."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from . import policies, refs
from .checks import check_pipeline
from .fields import PIPELINE_NAME, QUEUE_NAME
from .models import Pipeline
from .policy import FIELD_PATH, REF
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
    text: str = ""  # the file's content as loaded (services started later run this, not an edit)

    def resolve(self, ref: str) -> Any:
        """The function a `module:function` reference names, imported from the plugin folders."""
        return refs.resolve(ref, self.plugin_dirs)

    def file(self, relative: str) -> Path:
        """A path written in the pipeline file, relative to that file."""
        return (self.base_dir / relative).resolve()


def _key_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


def _inner(annotation: Any) -> Any:
    """The type a field holds, without Optional and Annotated."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, types.UnionType):
            options = [a for a in get_args(annotation) if a is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose mapping is written at `loc`, following field names, dict keys and indexes."""
    current: Any = Pipeline
    parts = list(loc)
    while parts:
        current = _inner(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            part = parts.pop(0)
            fields = {info.alias or name: info for name, info in current.model_fields.items()}
            if part not in fields:
                return None
            current = fields[part].annotation
        elif get_origin(current) in (dict, list):
            parts.pop(0)
            current = get_args(current)[-1]
        else:
            return None
    current = _inner(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_key(loc: Loc) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    keys = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r} (expected one of: {', '.join(keys)})"


_PATTERNS = {
    REF.pattern: "expected 'module:function'",
    QUEUE_NAME: "expected a queue name: 1 to 200 letters, digits, '_', '.', ':' or '-'",
    FIELD_PATH.pattern: "expected a field name, dotted for a nested field (order.account)",
    PIPELINE_NAME: "expected a name of 1 to 100 letters, digits, '_', '.' or '-'",
}


def _pydantic_message(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return _unknown_key(tuple(error["loc"]))
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch":
        pattern = str(error.get("ctx", {}).get("pattern", ""))
        return _PATTERNS.get(pattern, f"expected a value matching {pattern}")
    if kind == "model_type":
        policy = getattr(policies, str(error.get("ctx", {}).get("class_name")), None)
        form = getattr(policy, "form", "")
        return f"expected {form} or a mapping" if form else "expected a mapping"
    if kind == "dict_type":
        return "expected a mapping"
    if kind == "list_type":
        return "expected a list"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


class _Errors:
    """The errors found in one file, each placed at its line and column."""

    def __init__(self, path: Path, doc: Document) -> None:
        self.path, self.doc = path, doc
        self.found: list[tuple[int, int, str]] = []
        self.explained = [loc for loc, _, _ in doc.problems]  # the YAML problems' places

    @property
    def lines(self) -> list[str]:
        return [line for _, _, line in sorted(self.found, key=lambda f: (f[0], f[1]))]

    def add(self, loc: Loc, message: str, *, at: Position | None = None) -> None:
        pos = at or self._position(loc)
        line = f"{self.path}:{pos.line}:{pos.column}: {_key_path(loc)}: {message}"
        if all(line != seen for _, _, seen in self.found):
            self.found.append((pos.line, pos.column, line))

    def is_explained(self, loc: Loc) -> bool:
        """Whether a YAML problem at `loc` or above it (an unset variable) explains an error."""
        return any(loc[: len(r)] == r for r in self.explained)

    def _position(self, loc: Loc) -> Position:
        # A problem with a whole mapping (a consumer, a policy) is shown at its key: `c:`.
        return self.doc.position(loc, of_key=isinstance(self._data_at(loc), dict))

    def _data_at(self, loc: Loc) -> Any:
        data = self.doc.data
        for part in loc:
            try:
                data = data[part]
            except (KeyError, IndexError, TypeError):
                return None
        return data


def _validate(doc: Document, errors: _Errors) -> tuple[Pipeline | None, bool]:
    """The model, or None after adding its errors; and whether a top-level key is unknown."""
    try:
        return Pipeline.model_validate(doc.data), False
    except ValidationError as exc:
        unknown_top_level = False
        for error in exc.errors():
            loc, kind = tuple(error["loc"]), error["type"]
            unknown_top_level |= kind == "extra_forbidden" and len(loc) == 1
            if kind == "extra_forbidden":
                errors.add(loc, _pydantic_message(error), at=doc.position(loc, of_key=True))
            elif errors.is_explained(loc):
                continue
            elif kind == "missing":  # shown at the mapping that lacks the key: `c:` for c.from
                errors.add(loc, _pydantic_message(error), at=doc.position(loc[:-1], of_key=True))
            else:
                errors.add(loc, _pydantic_message(error))
        return None, unknown_top_level


def load_pipeline(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    check_refs: bool = True,
    text: str | None = None,
) -> LoadedPipeline:
    """Read and validate a pipeline file; raises PipelineError listing every problem. With `text`,
    that is the file's content (an earlier copy); paths in it are still relative to `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        raise PipelineError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise PipelineError([f"{path}: is a directory, not a pipeline file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError([f"{path}: cannot read: {exc}"]) from None
    try:
        doc = read_yaml(text, os.environ if env is None else env)
    except YamlSyntaxError as exc:
        raise PipelineError([f"{path}:{exc.position.line}:{exc.position.column}: {exc}"]) from None
    if doc.data is None:
        raise PipelineError([f"{path}:1:1: (top): the file is empty; expected a pipeline mapping"])
    errors = _Errors(path, doc)
    if not isinstance(doc.data, dict):
        errors.add((), "expected a mapping with version, name, producers and consumers")
        raise PipelineError(errors.lines)
    for loc, pos, message in doc.problems:
        errors.add(loc, message, at=pos)
    model, unknown_top_level = _validate(doc, errors)
    base_dir = path.resolve().parent
    # Without 'plugins' but with an unknown top-level key (`plugin:`?), every reference would
    # be reported as not found: one error would hide behind many.
    check_refs = check_refs and not (unknown_top_level and "plugins" not in doc.data)
    for loc, message in check_pipeline(doc.data, base_dir, check_refs=check_refs):
        if not errors.is_explained(loc):
            errors.add(loc, message)
    if model is None or errors.lines:
        raise PipelineError(errors.lines)
    return LoadedPipeline(
        model=model,
        path=path,
        base_dir=base_dir,
        plugin_dirs=refs.plugin_folders(base_dir, model.plugins),
        text=text,
    )
