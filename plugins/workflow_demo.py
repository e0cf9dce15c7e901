"""The workflow event pattern's trades (pattern 7): a source with malformed trades, some repairable.

The talk's demo sends trades `BUY,AAPL,<n>`, and one of them says `<n> shares` instead of a
number. Here `trades` yields the talk's accounts and symbols (plugins/trading.py's TALK_TRADES,
round and round) as PLACE orders, and every 21st trade, from the 5th on, has a malformed
`shares` (MALFORMED): seven that `trading:repair_trade` can fix (`"1740 shares"`, `"1,857 shares"`)
and three that it cannot (`"about 742"`, `"1297.5 shares"`, `"3.7k"`), which only a person can
decide. `trading:place_trade` rejects all ten by raising TradeRejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trading import TALK_TRADES

Event = dict[str, Any]

MALFORMED_EVERY, MALFORMED_FROM = 21, 5
# How each malformed trade, in turn, writes its shares (`{n}` is the number, `{k}` in thousands).
MALFORMED = (
    "{n} shares",  # the talk's: repairable
    "{n} shares",
    "{n:,} shares",  # a thousands separator: repairable
    "about {n}",  # a guess is not a number: a person decides
    "{n} shares",
    "{n}.5 shares",  # fractional shares: round up, round down, or ask the client?
    "{n} shares",
    "{n:,} shares",
    "{k:.1f}k",  # an abbreviation that lost the exact number
    "{n} shares",
)


def malformed(number: int) -> str | None:
    """The shares text of trade `number` if it is a malformed one, else None."""
    if number < MALFORMED_FROM or (number - MALFORMED_FROM) % MALFORMED_EVERY:
        return None
    return MALFORMED[(number - MALFORMED_FROM) // MALFORMED_EVERY % len(MALFORMED)]


def trades() -> Iterator[Event]:
    """A `module:function` source: PLACE orders at price 100, endless (`count` caps it: 200 gives
    ten malformed trades, seven of them repairable)."""
    number = 0
    while True:
        for account, side, symbol, shares in TALK_TRADES:
            number += 1
            text = malformed(number)
            yield {
                "id": number,
                "account": account,
                "side": side,
                "symbol": symbol,
                "shares": text.format(n=shares, k=shares / 1000) if text else shares,
                "price": 100.0,
                "kind": "PLACE",
            }
