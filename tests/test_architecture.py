"""The shape of the house (STYLE.md): which parts of `runner` may import which, read from the
source with `ast` (nothing is imported), plus house rules every module keeps."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "runner"


@dataclass(frozen=True)
class Module:
    name: str  # runner.config.loader
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def _modules() -> list[Module]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found.append(Module(".".join(parts), path, tree))
    return found


MODULES = _modules()


def _imports(module: Module) -> set[str]:
    """Every module name `module` imports, anywhere in it (functions included), made absolute.
    `from x import y` counts as importing both x and x.y (y may be a submodule)."""
    names: set[str] = set()
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module.name} imports {name}"
        for module in MODULES
        if _under(module.name, source)
        for name in _imports(module)
        if any(_under(name, target) for target in forbidden)
    )


RULES = [
    (
        "runner.config",
        ("runner.runtime", "runner.brokers", "runner.patterns", "runner.cli", "runner.telemetry"),
    ),
    ("runner.brokers", ("runner.patterns", "runner.runtime", "runner.cli")),
    ("runner.telemetry", ("runner.runtime", "runner.patterns", "runner.cli", "runner.config")),
    ("runner.patterns", ("runner.cli", "runner.brokers.memory", "runner.brokers.amqp")),
    ("runner.runtime", ("runner.cli",)),
]


@pytest.mark.parametrize(("source", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_dependency_rules(source: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(source, forbidden) == []


def test_only_the_entry_points_import_the_cli() -> None:
    allowed = {"runner.cli", "runner.__main__"}
    offenders = sorted(
        f"{module.name} imports {name}"
        for module in MODULES
        if module.name not in allowed
        for name in _imports(module)
        if _under(name, "runner.cli")
    )
    assert offenders == []


def test_no_module_calls_eval_or_exec() -> None:
    calls = sorted(
        f"{module.path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for module in MODULES
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec"})
            or (isinstance(node.func, ast.Attribute) and node.func.attr in {"eval", "exec"})
        )
    )
    assert calls == []


def test_every_module_has_a_docstring() -> None:
    missing = sorted(
        str(module.path.relative_to(PACKAGE.parent))
        for module in MODULES
        if not (ast.get_docstring(module.tree) or "").strip()
    )
    assert missing == []


# The checker itself: a rule that can never fail would prove nothing.


def test_the_import_walker_sees_relative_and_late_imports() -> None:
    source = "def f():\n    from ..runtime import app\n    import runner.cli\nfrom . import policy\n"
    module = Module("runner.config.x", PACKAGE / "config" / "x.py", ast.parse(source))
    names = _imports(module)
    assert {"runner.runtime", "runner.runtime.app", "runner.cli", "runner.config.policy"} <= names
    # in a package's __init__, `.` is the package itself
    package = Module("runner.config", PACKAGE / "config" / "__init__.py", ast.parse(source))
    assert {"runner.runtime.app", "runner.config.policy"} <= _imports(package)
    top = Module("runner.graph", PACKAGE / "graph.py", ast.parse("from .config import models\n"))
    assert _imports(top) == {"runner.config", "runner.config.models"}


def test_the_package_is_found() -> None:
    names = {module.name for module in MODULES}
    assert {"runner", "runner.cli", "runner.config.loader", "runner.brokers"} <= names
