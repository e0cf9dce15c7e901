"""`when(...)` expressions: CEL, compiled and checked when the file loads, never Python `eval`.

The CEL library compiles a call of any name and fails only when it evaluates it, so the load-time
check walks the compiled program's function references against the functions CEL defines.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

# CEL's operators (as the parser names them) and its standard functions and macros.
_OPERATORS = {
    "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "_+_", "_-_", "_*_", "_/_", "_%_", "-_", "!_",
    "_&&_", "_||_", "_?_:_", "_[_]", "@in", "@not_strictly_false",
}  # fmt: skip
# Only the functions this CEL library defines: a name it compiles but cannot call (`lowerAscii`,
# `split`, … of the strings extension) must fail at load, not silently evaluate to false.
_FUNCTIONS = {
    "size", "int", "uint", "double", "string", "bytes", "type", "dyn", "duration", "timestamp",
    "matches", "contains", "startsWith", "endsWith",
    "getFullYear", "getMonth", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours",
    "getMinutes", "getSeconds", "getMilliseconds", "exists", "all", "exists_one", "map", "filter",
}  # fmt: skip
KNOWN_FUNCTIONS = frozenset(_OPERATORS | _FUNCTIONS)


class ExpressionError(ValueError):
    """An expression that does not parse or calls a function CEL does not define."""


@lru_cache(maxsize=512)
def compile_expression(source: str) -> Any:
    """Compile and check `source`; the program is cached, so the runtime shares the load's work."""
    import cel  # here, not at the top: importing it costs a CLI start ~0.15 s (its own CLI)

    try:
        program = cel.compile(source)
    except (ValueError, RuntimeError) as exc:
        raise ExpressionError(f"invalid CEL expression {source!r}: {_detail(exc, source)}") from None
    unknown = sorted(set(program.functions()) - KNOWN_FUNCTIONS)
    if unknown:
        raise ExpressionError(f"invalid CEL expression {source!r}: unknown function {', '.join(unknown)}")
    return program


def _detail(exc: Exception, source: str) -> str:
    """The first error of the parser's message, in one line: `column 5: mismatched input …`."""
    detail = str(exc).splitlines()[0].removeprefix(f"Failed to parse expression {source!r}: ")
    detail = re.sub(r"^ERROR: <input>:\d+:(\d+): Syntax error: ", r"column \1: ", detail)
    return re.sub(r"expecting \{.*\}", "expecting an operand", detail)


def check_expression(source: str) -> None:
    """Raise ExpressionError unless `source` is a CEL expression that calls only known functions."""
    compile_expression(source)


def evaluate(source: str, event: dict[str, Any]) -> bool:
    """True when the expression holds for the event; a missing field or type error means False."""
    try:
        return compile_expression(source).execute(event) is True
    except (RuntimeError, ValueError, TypeError):
        return False
