"""The compact policy syntax: each parser turns one YAML string into its long-form mapping.

A model accepts either form; the compact string is parsed here into exactly the mapping a user
could have written, so both go through the same validation and give equal models.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"^\s*({_NUMBER})\s*(ms|s|m|h)\s*$")
_RATE = re.compile(rf"^\s*({_NUMBER})\s*/\s*(s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
FIELD_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class PolicySyntaxError(ValueError):
    """A compact string that does not parse; the message says what was expected."""


def _call(text: str, name: str) -> str | None:
    """The argument of `name(arg)`, or None when `text` is not such a call."""
    m = re.fullmatch(rf"\s*{name}\s*\((.*)\)\s*", text, flags=re.DOTALL)
    return m.group(1).strip() if m else None


def _options(text: str, allowed: set[str], expected: str) -> dict[str, str]:
    """`word value word value …` → {word: value}; any other shape is a syntax error."""
    words = text.split()
    if len(words) % 2:
        raise PolicySyntaxError(f"expected {expected}")
    options: dict[str, str] = {}
    for key, value in zip(words[::2], words[1::2], strict=True):
        if key not in allowed or key in options:
            raise PolicySyntaxError(f"expected {expected}")
        options[key] = value
    return options


def parse_duration(value: Any) -> float:
    """`250ms`, `1s`, `1.5s`, `2m`, `1h` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise PolicySyntaxError("expected a duration like '250ms', '1s', '2m'")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise PolicySyntaxError("expected a duration like '250ms', '1s', '2m'")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def parse_rate(value: Any) -> float:
    """`500/s`, `30/m`, `10/h` or a bare number (per second) → events per second."""
    if isinstance(value, bool):
        raise PolicySyntaxError("expected a rate like '500/s' or '30/m'")
    if isinstance(value, int | float):
        return float(value)
    m = _RATE.match(str(value))
    if not m:
        raise PolicySyntaxError("expected a rate like '500/s' or '30/m'")
    return float(m.group(1)) / _UNIT_SECONDS[m.group(2)]


def parse_by_context(text: str) -> dict[str, Any]:
    arg = _call(text, "by_context")
    if arg is None or not FIELD_PATH.match(arg):
        raise PolicySyntaxError("expected 'by_context(field)' with a (dotted) field name")
    return {"by": arg}


def parse_autoscale(text: str) -> dict[str, Any]:
    expected = "'depth/N max M [min K] [every D] [keep_alive D]'"
    m = re.fullmatch(r"\s*depth\s*/\s*(\S+)\s*(.*)", text)
    if not m:
        raise PolicySyntaxError(f"expected {expected}")
    if not re.fullmatch(r"[+-]?\d+", m.group(1)):
        raise PolicySyntaxError(f"expected {expected}: N in 'depth/N' is a whole number")
    options = _options(m.group(2), {"max", "min", "every", "keep_alive"}, expected)
    if "max" not in options:
        raise PolicySyntaxError(f"expected {expected}: 'max M' is required")
    return {"per": m.group(1), **options}


def parse_flow_control(text: str) -> dict[str, Any]:
    expected = "'upper U [lower L] [delay D] [every T]'"
    options = _options(text, {"upper", "lower", "delay", "every"}, expected)
    if "upper" not in options:
        raise PolicySyntaxError(f"expected {expected}: 'upper U' is required")
    return options


def parse_on_error(text: str) -> dict[str, Any]:
    expected = "'retry(N)', 'dead_letter' or 'workflow(module:function) [attempts N]'"
    text = text.strip()
    if text == "dead_letter":
        return {"action": "dead_letter"}
    if (arg := _call(text, "retry")) is not None:
        return {"action": "retry", "retries": arg}
    m = re.fullmatch(r"workflow\s*\(([^)]*)\)\s*(.*)", text)
    if m and not REF.match(m.group(1).strip()):
        raise PolicySyntaxError(f"expected {expected}: the repair function is module:function")
    if m:
        options = _options(m.group(2), {"attempts"}, expected)
        return {"action": "workflow", "repair": m.group(1).strip(), **options}
    raise PolicySyntaxError(f"expected {expected}")


def parse_when(text: str) -> str:
    arg = _call(text, "when")
    if arg is None or not arg:
        raise PolicySyntaxError("expected 'when(expression)'")
    return arg


def parse_priority_lane(value: Any) -> dict[str, Any]:
    if value is True:
        return {}
    if isinstance(value, str):
        return {"when": parse_when(value)}
    raise PolicySyntaxError("expected true, 'when(expression)' or a mapping {when, mode, carpool}")


def parse_source(text: str) -> dict[str, Any]:
    if (arg := _call(text, "file")) is not None:
        if not arg:
            raise PolicySyntaxError("expected 'file(path)' with a path")
        return {"file": arg}
    if REF.match(text.strip()):
        return {"function": text.strip()}
    raise PolicySyntaxError("expected 'file(path.jsonl|path.csv)' or 'module:function'")


def parse_dedupe(text: str) -> dict[str, Any]:
    expected = "'by(field) [ttl D] [size N]' (by(message_id) for the message id)"
    m = re.fullmatch(r"\s*by\s*\(([^)]*)\)\s*(.*)", text)
    if not m or not FIELD_PATH.match(m.group(1).strip()):
        raise PolicySyntaxError(f"expected {expected}")
    return {"by": m.group(1).strip(), **_options(m.group(2), {"ttl", "size"}, expected)}


def parse_spread(text: str) -> dict[str, Any]:
    if text.strip() == "round_robin":
        return {"mode": "round_robin"}
    if (arg := _call(text, "by_context")) is not None and FIELD_PATH.match(arg):
        return {"mode": "by_context", "by": arg}
    raise PolicySyntaxError("expected 'round_robin' or 'by_context(field)'")


def parse_traces(text: str) -> dict[str, Any]:
    text = text.strip()
    if text in ("none", "console", "otlp"):
        return {"exporter": text}
    if (arg := _call(text, "file")) is not None and arg:
        return {"exporter": "file", "path": arg}
    raise PolicySyntaxError("expected 'none', 'console', 'otlp' or 'file(path)'")


def parse_metrics(text: str) -> dict[str, Any]:
    expected = "'none', 'otlp', 'prometheus', 'prometheus(PORT)' or 'prometheus(HOST:PORT)'"
    text = text.strip()
    if text in ("none", "otlp", "prometheus"):
        return {"exporter": text}
    arg = _call(text, "prometheus")
    if arg is None:
        raise PolicySyntaxError(f"expected {expected}")
    host, colon, port = arg.rpartition(":")
    port = port.strip()
    if not re.fullmatch(r"\d+", port) or (colon and not host.strip()):
        raise PolicySyntaxError(f"expected {expected}: PORT is a number, an IPv6 HOST is in brackets")
    metrics: dict[str, Any] = {"exporter": "prometheus", "port": port}
    if colon:
        metrics["host"] = host.strip().removeprefix("[").removesuffix("]")
    return metrics
