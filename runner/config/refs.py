"""`module:function` references: imported from the pipeline's plugin folders, checked for shape."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class RefError(ValueError):
    """A reference whose module or function cannot be found, or that has the wrong signature."""


def plugin_folders(base_dir: Path, plugins: Sequence[str]) -> tuple[Path, ...]:
    """The plugin folders of a pipeline, absolute (they are written relative to its file)."""
    return tuple((base_dir / folder).resolve() for folder in plugins)


def _activate(plugin_dirs: Sequence[Path], module_name: str) -> None:
    # This pipeline's folders go first on the path, even when an earlier pipeline put them
    # (or others) there already: a module name is looked up in this pipeline's plugins first.
    for folder in reversed(plugin_dirs):
        entry = str(folder)
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    importlib.invalidate_caches()  # plugin files may have been written since the last import
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    origin = getattr(loaded, "__file__", None)
    if loaded is not None and origin is not None:
        # A module of the same name from another pipeline's plugins must not shadow this one's.
        here = [d for d in plugin_dirs if (d / f"{top}.py").exists() or (d / top).is_dir()]
        if here and not any(Path(origin).resolve().is_relative_to(d) for d in here):
            for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
                del sys.modules[name]


def resolve(ref: str, plugin_dirs: Sequence[Path]) -> Callable[..., Any]:
    """Import `module:function` with the plugin folders first on the path."""
    module_name, _, function_name = ref.partition(":")
    _activate(plugin_dirs, module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(f"{exc.name}.")):
            where = ", ".join(str(d) for d in plugin_dirs) or "no plugin folders (set 'plugins:')"
            raise RefError(f"module {module_name!r} not found in {where}") from None
        raise RefError(f"module {module_name!r} failed to import: {exc}") from None
    except (Exception, SystemExit) as exc:  # user code ran at import; report it in one line
        raise RefError(f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise RefError(f"module {module_name!r} has no function {function_name!r}")
    if not callable(function):
        raise RefError(f"{ref} is not callable")
    return function


def accepts(function: Callable[..., Any], counts: Sequence[int]) -> bool:
    """Whether `function` can be called with one of the given numbers of positional arguments."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    for count in counts:
        try:
            signature.bind(*range(count))
        except TypeError:
            continue
        return True
    return False


def check(ref: str, plugin_dirs: Sequence[Path], *, arity: Sequence[int], shape: str) -> Callable[..., Any]:
    """Resolve `ref` and check that it can be called with one of the `arity` argument counts."""
    function = resolve(ref, plugin_dirs)
    if not accepts(function, arity):
        raise RefError(f"{ref} must have the signature {shape}")
    return function
