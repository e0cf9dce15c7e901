"""`when(...)` expressions: CEL, compiled and checked when the file loads, never Python `eval`.

The CEL library compiles a call of any name and fails only when it evaluates it, so the load-time
check walks the compiled program's function references against the functions CEL defines.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import cel

# CEL's operators (as the parser names them) and its standard functions and macros.
_OPERATORS = {
    "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "_+_", "_-_", "_*_", "_/_", "_%_", "-_", "!_",
    "_&&_", "_||_", "_?_:_", "_[_]", "@in", "@not_strictly_false",
}  # fmt: skip
_FUNCTIONS = {
    "size", "int", "uint", "double", "string", "bytes", "bool", "type", "dyn", "duration",
    "timestamp", "matches", "contains", "startsWith", "endsWith", "lowerAscii", "upperAscii",
    "trim", "split", "replace", "join", "indexOf", "lastIndexOf", "substring", "charAt",
    "getFullYear", "getMonth", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours",
    "getMinutes", "getSeconds", "getMilliseconds", "exists", "all", "exists_one", "map", "filter",
}  # fmt: skip
KNOWN_FUNCTIONS = frozenset(_OPERATORS | _FUNCTIONS)


class ExpressionError(ValueError):
    """An expression that does not parse or calls a function CEL does not define."""


@lru_cache(maxsize=512)
def compile_expression(source: str) -> Any:
    """Compile and check `source`; the program is cached, so the runtime shares the load's work."""
    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0].removeprefix(f"Failed to parse expression {source!r}: ")
        raise ExpressionError(f"invalid CEL expression {source!r}: {detail}") from None
    unknown = sorted(set(program.functions()) - KNOWN_FUNCTIONS)
    if unknown:
        raise ExpressionError(
            f"invalid CEL expression {source!r}: unknown function {', '.join(unknown)}"
        )
    return program


def check_expression(source: str) -> None:
    compile_expression(source)


def evaluate(source: str, event: dict[str, Any]) -> bool:
    """True when the expression holds for the event; a missing field or type error means False."""
    try:
        return compile_expression(source).execute(event) is True
    except (RuntimeError, ValueError, TypeError):
        return False
