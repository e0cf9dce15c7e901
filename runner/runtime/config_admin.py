"""`edarun config PIPELINE set KEY VALUE | get [KEY]`: talk to a pipeline's config service (pattern 4).

Both go through the broker, so they work from any machine that reaches it. `set` queues a command
on the durable `<pipeline>.config` queue and waits a few seconds for the config service's answer
(the change's version); when no service answers, the change stays queued and is applied when the
pipeline's config service runs. `get` asks the running service; without one, it reads the stored
snapshot (and says so). The embedded `memory` broker lives inside one `edarun up` process, which
nothing outside can reach: there a handler changes a value by publishing the same command.
"""

from __future__ import annotations

import json
from typing import Any

from ..brokers import Broker
from ..config.loader import LoadedPipeline
from ..config.models import is_memory
from ..patterns.watch import RESERVED_PREFIX, ConfigClient, config_queue
from . import loop as event_loop
from .app import EXIT_INVALID, RunError, broker_urls, connect

ANSWER_WITHIN = 5.0  # seconds: the config service answers in milliseconds when it runs


def parse_value(text: str) -> Any:
    """VALUE as JSON when it parses (`900`, `true`, `{"a": 1}`), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ConfigAdmin:
    def __init__(self, loaded: LoadedPipeline, broker_url: str | None, timeout: float) -> None:
        self.loaded = loaded
        self.override = broker_url
        self.timeout = timeout
        if any(is_memory(url) for url in broker_urls(loaded, broker_url)):
            queue = config_queue(loaded.model.name)
            raise RunError(
                "the memory broker lives inside one `edarun up` process, which `edarun config` cannot "
                f"reach (there a handler sets a value with ctx.publish({queue!r}, "
                '{"op": "set", "key": KEY, "value": VALUE})); use --broker amqp://…',
                EXIT_INVALID,
            )
        self.notes: list[str] = []  # said on stderr after the answer

    async def _connect(self) -> Broker:
        # The pipeline's broker, or its brokers (pattern 9), as its services reach them: the
        # command goes where the config service reads, and the answer comes from any of them.
        return await connect(self.loaded, self.override, self.timeout)

    async def set(self, key: str, value: Any) -> dict[str, Any]:
        if key.startswith(RESERVED_PREFIX):
            raise RunError(f"{key!r}: keys starting with {RESERVED_PREFIX!r} are edarun's own", EXIT_INVALID)
        model = self.loaded.model
        if key not in model.config:
            self.notes.append(f"note: {key!r} is not in the pipeline's config: (no consumer watches it)")
        broker = await self._connect()
        try:
            client = ConfigClient(model.name, broker)
            answer = await client.request({"op": "set", "key": key, "value": value}, ANSWER_WITHIN)
        finally:
            await broker.close()
        if answer is None:
            self.notes.append(
                f"note: no config service answered within {ANSWER_WITHIN:g}s; the change is queued on "
                f"{config_queue(model.name)!r} and applied when the pipeline runs"
            )
            return {"key": key, "value": value, "queued": True}
        return {"key": key, "value": value, "version": answer.get("versions", {}).get(key)}

    async def get(self, key: str | None) -> Any:
        model = self.loaded.model
        broker = await self._connect()
        try:
            client = ConfigClient(model.name, broker)
            answer = await client.request(
                {"op": "get", "keys": None if key is None else [key]}, ANSWER_WITHIN
            )
            if answer is not None:
                values = answer.get("values", {})
            else:
                stored = await client.stored()
                values = {**model.config, **(stored.values if stored is not None else {})}
                self.notes.append(
                    "note: no config service answered; these are the stored values"
                    + ("" if stored is not None else " (none stored yet: the file's)")
                    + ", without changes still queued for it"
                )
        finally:
            await broker.close()
        values = {k: v for k, v in values.items() if not k.startswith(RESERVED_PREFIX)}
        if key is None:
            return values
        if key not in values:
            raise RunError(f"{key!r}: no such config value in {model.name}", EXIT_INVALID)
        return values[key]


def run_config(
    loaded: LoadedPipeline, broker_url: str | None, timeout: float, action: str, *args: Any
) -> Any:
    """Run one `config` action; returns its result and the notes to print."""
    admin = ConfigAdmin(loaded, broker_url, timeout)
    result = event_loop.run(admin.set(*args) if action == "set" else admin.get(*args))
    return result, admin.notes
