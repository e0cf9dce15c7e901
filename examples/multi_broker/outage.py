"""The demo's orders and its order taker: each handler call appends `<id> <broker> <time>` to the
file named by $OUTAGE_LOG (one `os.write` per call, so the processes' lines never interleave)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

_LOG = os.open(os.environ.get("OUTAGE_LOG", os.devnull), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def orders() -> Iterator[dict[str, Any]]:
    for n in range(int(os.environ.get("OUTAGE_EVENTS", "6000"))):
        yield {"id": n, "account": f"A-{n % 50}", "shares": 100 + n % 900}


def take_order(order: dict[str, Any], ctx: Any) -> None:
    time.sleep(0.0005)  # the order taker's own work
    os.write(_LOG, f"{order['id']} {ctx.broker} {time.time():.4f}\n".encode())
