"""The event loop every edarun process runs on: uvloop where it is installed, asyncio otherwise.

uvloop's faster I/O and callbacks are most of the per-message cost left on RabbitMQ, where aiormq
does a socket write and several loop turns per message. `EDARUN_LOOP=asyncio` opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
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


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(callback: Callable[[], None]) -> None:
    """Ctrl-C and SIGTERM call `callback` (a drain) instead of interrupting whatever runs."""
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        # Outside the main thread (tests) there are no signal handlers: stop with the callback.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, callback)


def default_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
