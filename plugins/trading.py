"""Handlers of the trading pipelines: place or cancel a trade, then settle its confirmation.

`place_trade` is a plain function (edarun runs it in a worker thread); `settle_trade` is a coroutine
(it runs on the event loop). A trade whose `shares` is not a whole number — the talk's
`BUY,AAPL,1200 shares` — is rejected by raising, so the consumer's `on_error` retries it and then
parks it in the dashboard: it is never silently dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

# The ten trades the talk's thread-delegate demo sends (account, side, symbol, shares).
TALK_TRADES = (
    ("B-123", "SELL", "AAPL", 206), ("Q-665", "SELL", "ATT", 1165), ("B-123", "BUY", "IBM", 3700),
    ("Q-665", "SELL", "XPH", 1174), ("Q-665", "BUY", "GLD", 1740), ("T-329", "SELL", "GOOG", 61),
    ("D-945", "SELL", "FB", 1857), ("D-945", "SELL", "AAPL", 742), ("T-329", "BUY", "AAPL", 466),
    ("D-945", "BUY", "AMZN", 1297),
)  # fmt: skip


class TradeRejected(ValueError):
    """A trade that cannot be placed as it is (bad shares, unknown side or kind)."""


def talk_trades() -> Iterator[Event]:
    """A `module:function` source: the talk's ten demo trades, all PLACE orders at price 100."""
    for number, (account, side, symbol, shares) in enumerate(TALK_TRADES, start=1):
        yield {
            "id": number,
            "account": account,
            "side": side,
            "symbol": symbol,
            "shares": shares,
            "price": 100.0,
            "kind": "PLACE",
        }


def _checked(trade: Event) -> tuple[int, float]:
    number, shares, price = trade.get("id"), trade.get("shares"), trade.get("price")
    if not isinstance(shares, int) or isinstance(shares, bool) or shares <= 0:
        raise TradeRejected(f"trade {number}: shares must be a whole number, got {shares!r}")
    if not isinstance(price, int | float) or isinstance(price, bool) or price <= 0:
        raise TradeRejected(f"trade {number}: price must be positive, got {price!r}")
    if trade.get("side") not in ("BUY", "SELL") or trade.get("kind") not in ("PLACE", "CANCEL"):
        raise TradeRejected(f"trade {number}: unknown side or kind")
    return shares, float(price)


def place_trade(trade: Event, ctx: Context) -> Event:
    """Place (or cancel) one trade and return its confirmation, which `emit` publishes.

    Raises TradeRejected for a malformed trade; the consumer's `on_error` takes it from there.
    """
    shares, price = _checked(trade)
    latency = ctx.config.get("exchange_latency_ms")  # watched in trading.yaml (pattern 4)
    if latency:
        time.sleep(latency / 1000)  # the exchange's round trip: blocking, so in a worker thread
    status = "placed" if trade["kind"] == "PLACE" else "cancelled"
    ctx.log.debug("worker %d: %s %s", ctx.worker, status, trade["id"])
    return {
        "trade": trade["id"],
        "account": trade["account"],
        "side": trade["side"],
        "symbol": trade["symbol"],
        "shares": shares,
        "notional": round(shares * price, 2),
        "status": status,
        "attempt": ctx.attempt,
    }


async def settle_trade(confirmation: Event, ctx: Context) -> None:
    """Settle a confirmed trade (a stand-in for a call to a settlement system)."""
    await asyncio.sleep(0)  # the await where a real client would talk to the settlement system
    if ctx.redelivered:
        # At-least-once means a confirmation can arrive twice; a real settlement is keyed on it.
        ctx.log.info("confirmation of trade %s delivered again", confirmation.get("trade"))


def repair_trade(trade: Event, error: str, ctx: Context) -> Event | None:
    """Repair function for `on_error: workflow(trading:repair_trade)` (pattern 7, a later version).

    Fixes the talk's malformed trade — `"shares": "1200 shares"` becomes `1200` — and returns the
    corrected event; anything else cannot be repaired here (None), so it is parked in the dashboard.
    """
    shares = trade.get("shares")
    if isinstance(shares, str):
        number = shares.strip().removesuffix("shares").strip().replace(",", "")
        if number.isdigit() and int(number) > 0:
            ctx.log.info("Trade fixed: %s,%s,%s", trade.get("side"), trade.get("symbol"), number)
            return {**trade, "shares": int(number)}
    return None
