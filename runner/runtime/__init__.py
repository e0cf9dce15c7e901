"""Running pipelines: the entry points the CLI calls."""

from __future__ import annotations

import asyncio

from ..config.loader import LoadedPipeline
from .app import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, RunError, Runner, RunOptions

__all__ = [
    "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "RunError", "RunOptions", "Runner",
    "run_pipeline", "send_event",
]  # fmt: skip


def run_pipeline(loaded: LoadedPipeline, options: RunOptions) -> int:
    """Run `loaded` to its end; returns the exit code. Raises RunError when it cannot start."""
    runner = Runner(loaded, options)
    return asyncio.run(runner.run())


def send_event(
    loaded: LoadedPipeline, queue: str, event: dict, broker_url: str | None, timeout: float
) -> str:  # type: ignore[type-arg]
    """Publish one event to a queue of a running pipeline's broker; returns its message id."""
    from .send import send

    return asyncio.run(send(loaded, queue, event, broker_url, timeout))
