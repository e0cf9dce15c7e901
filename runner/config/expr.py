"""`when(...)` expressions: CEL, compiled and checked when the file loads, never Python `eval`.

The CEL library compiles a call of any name and fails only when it evaluates it, so the load-time
check walks the compiled program's function references against the functions CEL defines.

An expression is evaluated on every event a laned queue is sent (pattern 3), so its cost is paid
per event: a CEL call converts its whole activation (about 2 µs for one field, 20 µs for fifty),
which is more than the rest of publishing on the memory broker. Most expressions are comparisons
of fields with literals joined by `&&`, `||` and `!`; those are compiled to Python closures with
CEL's semantics (heterogeneous `==`, errors absorbed by `&&`/`||` as CEL absorbs them, an error
overall means "does not hold"), and every other expression goes to CEL with only the fields it
names. `tests/config/test_expr.py` checks the two agree on generated expressions and events.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
    return predicate(source)(event)


Predicate = Callable[[dict[str, Any]], bool]


@lru_cache(maxsize=512)
def predicate(source: str) -> Predicate:
    """The expression as a function of an event, compiled once (see the module docstring)."""
    program = compile_expression(source)
    names = tuple(program.variables())

    def with_cel(event: dict[str, Any]) -> bool:
        try:
            return program.execute({n: event[n] for n in names if n in event}) is True
        except Exception:  # an evaluation error (missing field, no such overload): not priority
            return False

    fast = _Simple.compile(source, whole=with_cel)
    if fast is None:
        return with_cel
    if getattr(fast, "whole", False):
        return fast  # `field op literal` alone: it answers True or False itself

    def holds(event: dict[str, Any]) -> bool:
        result = fast(event)
        return with_cel(event) if result is _CEL else result is True

    return holds


# -- the simple subset ---------------------------------------------------------------------------

_ERROR = object()  # an evaluation error, absorbed by && and || as CEL absorbs it
_CEL = object()  # a value this subset does not model exactly (a list, a map, a huge int): ask CEL
_TOKEN = re.compile(
    r"""\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.]))|(?P<str>"[^"\\\n]*"|'[^'\\\n]*')"""
    r"""|(?P<op>==|!=|<=|>=|&&|\|\||[<>!().])|(?P<name>[A-Za-z_]\w*))"""
)
_KEYWORDS = {"true": True, "false": False, "null": None}
_RESERVED = {"in", "as", "break", "const", "continue", "else", "for", "function", "if", "import",
             "let", "loop", "package", "namespace", "return", "var", "void", "while"}  # fmt: skip
_INT64 = 2**63
Node = Callable[[dict[str, Any]], Any]


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return None  # lists and maps: CEL's equality on them is not modelled here


def _equal(left: Any, right: Any) -> Any:
    if left is _ERROR or right is _ERROR:
        return _ERROR
    if left is _CEL or right is _CEL:
        return _CEL
    kinds = _kind(left), _kind(right)
    if None in kinds:
        return _CEL
    if isinstance(left, int) and not isinstance(left, bool) and abs(left) >= _INT64:
        return _CEL
    if isinstance(right, int) and not isinstance(right, bool) and abs(right) >= _INT64:
        return _CEL
    return kinds[0] == kinds[1] and left == right


def _order(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    def ordered(left: Any, right: Any) -> Any:
        if left is _ERROR or right is _ERROR:
            return _ERROR
        if left is _CEL or right is _CEL:
            return _CEL
        kinds = _kind(left), _kind(right)
        if None in kinds:
            return _CEL
        if kinds[0] != kinds[1] or kinds[0] == "null":
            return _ERROR  # CEL has no ordering across types, nor on null
        if kinds[0] == "number" and any(isinstance(v, int) and abs(v) >= _INT64 for v in (left, right)):
            return _CEL
        return compare(left, right)

    return ordered


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": _equal,
    "!=": lambda a, b: r if (r := _equal(a, b)) is _ERROR or r is _CEL else not r,
    "<": _order(lambda a, b: a < b),
    "<=": _order(lambda a, b: a <= b),
    ">": _order(lambda a, b: a > b),
    ">=": _order(lambda a, b: a >= b),
}


def _boolean(value: Any) -> Any:
    return value if isinstance(value, bool) or value is _CEL else _ERROR


class _Simple:
    """A recursive-descent compiler for: comparisons of (dotted) fields and literals, `&&`, `||`,
    `!` and parentheses. `compile` returns None for anything else."""

    def __init__(self, tokens: list[tuple[str, str]], whole: Predicate | None) -> None:
        self.tokens = tokens
        self.at = 0
        self.whole = whole

    @classmethod
    def compile(cls, source: str, whole: Predicate | None = None) -> Node | None:
        """The expression's node; with `whole` (CEL on the whole expression), an expression that is
        one `field op literal` comparison becomes a predicate itself (marked `.whole`)."""
        tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(source):
            if source[position:].strip() == "":
                break
            match = _TOKEN.match(source, position)
            if match is None:
                return None
            kind = match.lastgroup
            assert kind is not None
            tokens.append((kind, match.group(kind)))
            position = match.end()
        parser = cls(tokens, whole)
        try:
            node = parser._or()
        except _NotSimple:
            return None
        return node if parser.at == len(tokens) else None

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _take(self, *values: str) -> str | None:
        token = self._peek()
        if token is not None and token[0] == "op" and token[1] in values:
            self.at += 1
            return token[1]
        return None

    def _or(self) -> Node:
        return self._chain("||", self._and, decisive=True)

    def _and(self) -> Node:
        return self._chain("&&", self._unary, decisive=False)

    def _chain(self, op: str, operand: Callable[[], Node], *, decisive: bool) -> Node:
        """`a op b op …`; a part worth `decisive` decides the whole (True for ||, False for &&).
        Otherwise an error wins over the other value, unless CEL has to be asked: as CEL absorbs
        an error when another part decides."""
        parts = [operand()]
        while self._take(op):
            parts.append(operand())
        if len(parts) == 1:
            return parts[0]

        def chained(event: dict[str, Any]) -> Any:
            outcome: Any = not decisive
            for part in parts:
                value = _boolean(part(event))
                if value is decisive:
                    return decisive
                if value is not (not decisive) and outcome is not _CEL:
                    outcome = value  # an error, unless another part decides
            return outcome

        return chained

    def _unary(self) -> Node:
        if self._take("!"):
            inner = self._unary()

            def negated(event: dict[str, Any]) -> Any:
                value = _boolean(inner(event))
                return value if value is _ERROR or value is _CEL else not value

            return negated
        return self._comparison()

    def _comparison(self) -> Node:
        if self._take("("):
            node = self._or()
            if not self._take(")"):
                raise _NotSimple
            return node
        left_at = self.at
        left = self._operand()
        left_end = self.at
        op = self._take(*_COMPARE)
        if op is None:
            return left
        right_at = self.at
        right = self._operand()
        fast = None
        whole = self.whole if left_at == 0 and self.at == len(self.tokens) else None
        left_name, right_literal = self._name(left_at, left_end), self._literal(right_at)
        if left_name is not None and right_literal is not _NONE:
            fast = _field_against(left_name, op, right_literal, whole)
        right_name, left_literal = self._name(right_at, self.at), self._literal(left_at)
        if right_name is not None and left_literal is not _NONE:
            fast = _field_against(right_name, _MIRROR[op], left_literal, whole)
        if fast is not None:
            return fast
        compare = _COMPARE[op]
        return lambda event: compare(left(event), right(event))

    def _literal(self, index: int) -> Any:
        """The value of the operand at `index` when it is a literal, else _NONE."""
        kind, text = self.tokens[index]
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "str":
            return text[1:-1]
        return _KEYWORDS[text] if kind == "name" and text in _KEYWORDS else _NONE

    def _name(self, start: int, end: int) -> str | None:
        """The field of the operand in tokens start…end when it is one top-level name."""
        kind, text = self.tokens[start]
        return text if end == start + 1 and kind == "name" and text not in _KEYWORDS else None

    def _operand(self) -> Node:
        token = self._peek()
        if token is None:
            raise _NotSimple
        kind, text = token
        self.at += 1
        if kind == "num":
            value: Any = float(text) if any(c in text for c in ".eE") else int(text)
            if isinstance(value, int) and abs(value) >= _INT64:
                raise _NotSimple
            return lambda event: value
        if kind == "str":
            literal = text[1:-1]
            return lambda event: literal
        if kind != "name" or text in _RESERVED:
            raise _NotSimple
        if text in _KEYWORDS:
            constant = _KEYWORDS[text]
            return lambda event: constant
        path = [text]
        while self._take("."):
            token = self._peek()
            if token is None or token[0] != "name" or token[1] in _RESERVED or token[1] in _KEYWORDS:
                raise _NotSimple
            path.append(token[1])
            self.at += 1
        token = self._peek()
        if token is not None and token[1] in ("(", "["):
            raise _NotSimple  # a call or an index: CEL's
        if len(path) == 1:
            name = path[0]
            return lambda event: event.get(name, _ERROR)

        def field(event: dict[str, Any]) -> Any:
            value: Any = event
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    return _ERROR
                value = value[part]
            return value

        return field


_NONE = object()  # not a literal
_MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_NUMBER = (int, float)


def _field_against(name: str | None, op: str, literal: Any, whole: Predicate | None) -> Node | None:
    """`field op literal` for a top-level field, specialised on the literal's type: the common
    `kind == "CANCEL"` and `shares > 1000` cost a dict lookup and a comparison. With `whole` (CEL on
    the whole expression, when this comparison is all of it) the result is a predicate: True or
    False, an error being False, and CEL asked where this subset is not exact."""
    if name is None:
        return None
    missing = _ERROR
    error: Any = False if whole is not None else _ERROR
    node: Any = None
    if isinstance(literal, str) and op in ("==", "!="):
        equal = op == "=="

        def with_string(event: dict[str, Any]) -> Any:
            value = event.get(name, missing)
            if value.__class__ is str:
                return (value == literal) is equal
            if value is missing:
                return error
            if isinstance(value, list | dict):
                return _CEL if whole is None else whole(event)
            return not equal

        node = with_string
    elif literal.__class__ in _NUMBER and op in ("<", "<=", ">", ">="):
        compare = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}[op]
        bound = float(literal)
        if isinstance(literal, int) and float(literal) != literal:
            return None  # not exact as a float

        def with_number(event: dict[str, Any]) -> Any:
            value = event.get(name, missing)
            kind = value.__class__
            if kind is float or (kind is int and -_INT64 < value < _INT64 and float(value) == value):
                return compare(float(value), bound)
            if value is missing or kind is str or kind is bool or value is None:
                return error
            return _CEL if whole is None else whole(event)

        node = with_number
    if node is not None and whole is not None:
        node.whole = True
    return node


class _NotSimple(Exception):
    """The expression is outside the simple subset: CEL evaluates it."""
