"""`when(...)`: the Python closures of simple expressions agree with CEL on every event."""

from __future__ import annotations

from typing import Any

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.config.expr import _Simple, evaluate

FIELDS = ["kind", "shares", "flag", "order.account", "order.size", "missing", "order.missing.deep"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.floats(-3, 3, allow_nan=False),
    st.sampled_from(["", "A", "B", "CANCEL", "a'b", "é"]),
)
VALUES = st.one_of(
    SCALARS, st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.sampled_from("ab"), SCALARS)
)


def literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"' if "'" in value else "'" + value + "'"
    return repr(value)


LITERALS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, -1.5, 2.0, 1e3]),
                     st.sampled_from(["A", "CANCEL", "", "a'b"])).map(literal)  # fmt: skip
OPERANDS = st.one_of(st.sampled_from(FIELDS), LITERALS)
COMPARISONS = st.builds(
    lambda a, op, b: f"{a} {op} {b}", OPERANDS, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), OPERANDS
)
EXPRESSIONS = st.recursive(
    st.one_of(COMPARISONS, st.sampled_from(FIELDS), st.sampled_from(["true", "false"])),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} && {b}", inner, inner),
        st.builds(lambda a, b: f"{a} || {b}", inner, inner),
        inner.map(lambda a: f"!({a})"),
        inner.map(lambda a: f"({a})"),
    ),
    max_leaves=6,
)
EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "kind": VALUES,
        "shares": VALUES,
        "flag": VALUES,
        "order": st.one_of(VALUES, st.fixed_dictionaries({}, optional={"account": VALUES, "size": VALUES})),
    },
)


def by_cel(source: str, event: dict[str, Any]) -> bool:
    try:
        return cel.compile(source).execute(event) is True
    except Exception:
        return False


@settings(max_examples=1500, deadline=None)
@given(EXPRESSIONS, EVENTS)
def test_simple_expressions_agree_with_cel(source: str, event: dict[str, Any]) -> None:
    assert _Simple.compile(source) is not None, source
    assert evaluate(source, event) == by_cel(source, event), (source, event)


@pytest.mark.parametrize(
    "source",
    [
        "size(kind) > 2",
        "kind in ['A', 'B']",
        "kind.startsWith('A')",
        "shares * 2 > 10",
        "-shares < 1",
        "order['account'] == 'A'",
        "has(order.account)",
        "shares == 1u",
        "kind == r'A'",
        'kind == "a\\"b"',
        "shares == 0x10",
    ],
)
def test_other_expressions_go_to_cel(source: str) -> None:
    assert _Simple.compile(source) is None
    for event in ({"kind": "ABC", "shares": 16, "order": {"account": "A"}}, {}, {"order": 3}):
        assert evaluate(source, event) == by_cel(source, event), (source, event)


def test_a_missing_nested_field_is_not_an_exception() -> None:
    # CEL raises KeyError there, which is not one of its usual evaluation errors.
    assert evaluate("order.account.size() > 1", {"order": {}}) is False
    assert evaluate("order.account == 'A'", {"order": {}}) is False
