"""The event loop every edarun process runs on: uvloop where it is installed, asyncio otherwise.

uvloop's faster I/O and callbacks are most of the per-message cost left on RabbitMQ, where aiormq
does a socket write and several loop turns per message. `EDARUN_LOOP=asyncio` opts out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    if os.environ.get("EDARUN_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
