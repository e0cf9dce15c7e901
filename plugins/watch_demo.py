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
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

# The config service's command queue: `<pipeline>.config`, for pipelines/watch_notification.yaml's name.
CONFIG_QUEUE = "watch-notification.config"
KEY = "max_order"
CHANGES = (900, 1100, 750)
CHANGE_EVERY_S = 0.6  # far apart next to the orders (20 a second): each service sees every value

# The limit each service (consumer name) last worked with. take_order is a coroutine and does not
# await between reading and writing it, so calls on the event loop cannot interleave there.
_seen: dict[str, Any] = {}


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
    limit = ctx.config[KEY]  # read once: the watch queue may bring a change between two reads
    before, _seen[ctx.consumer] = _seen.get(ctx.consumer), limit
    if before is None:
        ctx.log.info("%s: Config value = %s", ctx.consumer, limit)
    elif before != limit:
        ctx.log.info("%s: New Config Value Received: %s", ctx.consumer, limit)
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        # A value set by hand (`edarun config set max_order abc`): fail, so on_error parks the order.
        raise ValueError(f"max_order must be a number, got {limit!r}")
    verdict = "accepted" if order["amount"] <= limit else "refused"
    ctx.log.debug(
        "%s: order %s (%s) %s at max_order %s", ctx.consumer, order["id"], order["amount"], verdict, limit
    )
