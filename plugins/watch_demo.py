"""The watch notification pattern's orders and limit changes (pattern 4): two sources and two handlers.

`orders` is an endless order feed (the producers' `count` caps it, their `rate` paces it).
`limit_changes` is an operator at an admin console who changes `max_order` three times, one change
every CHANGE_EVERY_S. `relay_change` turns each change into a `set` command on the pipeline's config
queue, in the documented command format. `take_order` is the watching service: it reads the limit
from `ctx.config` and says, in the talk's words, the value it started with and each new value it
sees.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

# The config service's command queue is named after the pipeline: `<pipeline>.config`.
CONFIG_QUEUE = "watch-notification.config"
KEY = "max_order"
CHANGES = (900, 1100, 750)
CHANGE_EVERY_S = 0.6  # far apart next to the orders (20 a second): each service sees every value

# The limit each service (consumer name) last worked with. Handlers of different consumers may run in
# different threads, so the map is guarded.
_seen: dict[str, Any] = {}
_seen_lock = threading.Lock()


def orders() -> Iterator[Event]:
    """Orders of 50 to 1,250, round and round, so a lower or higher limit refuses more or fewer."""
    number = 0
    while True:
        number += 1
        yield {"id": number, "amount": 50 + (number * 370) % 1200}


async def limit_changes() -> AsyncIterator[Event]:
    """The operator's changes of `max_order`. Waiting before each one lets the services work with the
    current value first, as they would between two real changes."""
    for value in CHANGES:
        await asyncio.sleep(CHANGE_EVERY_S)
        yield {"key": KEY, "value": value}


def relay_change(change: Event, ctx: Context) -> None:
    """Send one change to the config service: a `set` command, published after this call returns."""
    ctx.log.info("%s: set %s = %s", ctx.consumer, change["key"], change["value"])
    ctx.publish(CONFIG_QUEUE, {"op": "set", "key": change["key"], "value": change["value"]})


async def take_order(order: Event, ctx: Context) -> None:
    """Accept an order up to the current `max_order`, refuse one above it."""
    limit = ctx.config[KEY]  # live: the watch queue keeps it current between two events
    with _seen_lock:
        before = _seen.get(ctx.consumer)
        _seen[ctx.consumer] = limit
    if before is None:
        ctx.log.info("%s: Config value = %s", ctx.consumer, limit)
    elif before != limit:
        ctx.log.info("%s: New Config Value Received: %s", ctx.consumer, limit)
    verdict = "accepted" if order["amount"] <= limit else "refused"
    ctx.log.debug("%s: order %s of %s %s (max_order %s)", ctx.consumer, order["id"], order["amount"], verdict, limit)
