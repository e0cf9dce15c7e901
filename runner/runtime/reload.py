"""`edarun up --reload`: watch the pipeline file and send edited policies to the running services.

The file is checked twice a second. An edit is loaded and validated like any pipeline file; one
with errors is reported (file:line:col) and the running policies stay. A valid edit is compared with
the running file (config.changes): when every change can be applied live, the new policies go to the
config service as the reserved value `edarun.policy` (and edited `config:` values as values), which
sends them to every registered service through its watch queue (patterns.watch); each service
applies what concerns it between two events. When some change cannot be applied live, nothing is
applied: the running pipeline stays one version of the file, and the message names the services a
restart would bring up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..brokers import BrokerError
from ..config.changes import compare
from ..config.loader import LoadedPipeline, PipelineError, load_pipeline
from ..config.models import Pipeline
from ..patterns.watch import POLICY_KEY

log = logging.getLogger("edarun.reload")

CHECK_EVERY = 0.5


def policy_document(model: Pipeline) -> dict[str, Any]:
    """The value of `edarun.policy`: the whole model as JSON (services take their part of it)."""
    return model.model_dump(mode="json", by_alias=True)


class Reloader:
    """Follows one pipeline file for a running `up`."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        applied: Callable[[LoadedPipeline, list[str]], None] | None = None,
        refused: Callable[[list[str]], None] | None = None,
        every: float = CHECK_EVERY,
    ) -> None:
        self.loaded = loaded  # the file as the services run it
        self.send = send  # {key: value}: one `set` command to the config service
        self.applied = applied
        self.refused = refused
        self.every = every
        self.path = loaded.path
        # What the services run: an edit made while `up` was connecting is an edit too.
        self.text: str | None = loaded.text
        self.stopping = asyncio.Event()
        self._unsent = False  # the last edit could not be sent yet

    def _read(self) -> str | None:
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except OSError:
            return None

    async def run(self) -> None:
        log.info("watching %s for policy edits", self.path)
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.every)
            text = self._read()
            if text is None or text == self.text:
                continue
            if await self.check():
                self.text = text  # settled: applied, refused, or invalid until the next edit

    async def check(self) -> bool:
        """Load the file as it is now and apply it, refuse it, or say it is invalid. False when it
        could not be sent (the broker is unreachable): the next check tries again."""
        try:
            edited = load_pipeline(self.path)
        except PipelineError as exc:
            for line in exc.lines:
                log.error("%s", line)
            log.error("the edit is not applied; the running policies stay")
            if self.refused is not None:
                self.refused(exc.lines)
            return True
        changes = compare(self.loaded.model, edited.model)
        if changes.empty:
            return True
        if changes.restart:
            lines = [f"not applied live: {what}" for what in changes.restart]
            lines.append(
                f"nothing of this edit is applied; restart `edarun up` to apply it (restarts: "
                f"{', '.join(changes.services)})"
            )
            for line in lines:
                log.warning("%s", line)
            if self.refused is not None:
                self.refused(lines)
            return True
        values = dict(changes.config)
        if any(not line.startswith("config.") for line in changes.live):
            values[POLICY_KEY] = policy_document(edited.model)
        try:
            await self.send(values)  # one command: the config service applies all of it or none
        except BrokerError as exc:
            if not self._unsent:
                log.error("the edit could not be sent to the config service (%s); trying again", exc)
            self._unsent = True
            return False
        self._unsent = False
        self.loaded = edited
        for line in changes.live:
            log.info("applied: %s", line)
        if self.applied is not None:
            self.applied(edited, changes.live)
        return True

    def stop(self) -> None:
        self.stopping.set()
