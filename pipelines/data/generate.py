"""Writes the sample data of the shipped pipelines: `trades.jsonl` and `payments.jsonl`.

Deterministic (fixed seeds), so the files only change when this script does:
`.venv/bin/python pipelines/data/generate.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# The accounts and symbols of the talk's trading demos.
ACCOUNTS = ("B-123", "Q-665", "T-329", "D-945", "A-136", "V-976")
SYMBOLS = {"AAPL": 187.0, "GOOG": 139.0, "IBM": 162.0, "ATT": 17.0, "XPH": 41.0, "GLD": 190.0,
           "FB": 330.0, "AMZN": 145.0}  # fmt: skip
TRADES, MALFORMED, CANCEL_SHARE = 1000, 10, 0.08


def trades(seed: int = 136) -> list[dict[str, Any]]:
    """~1000 PLACE/CANCEL trades; MALFORMED of them say `"<n> shares"` instead of a number."""
    rng = random.Random(seed)
    prices = dict(SYMBOLS)
    placed: dict[str, list[dict[str, Any]]] = {account: [] for account in ACCOUNTS}
    out: list[dict[str, Any]] = []
    for number in range(1, TRADES + 1):
        account = rng.choice(ACCOUNTS)
        if placed[account] and rng.random() < CANCEL_SHARE:
            # A cancel repeats the trade it cancels, as in the talk: CANCEL BUY AAPL A-136 …
            earlier = placed[account].pop(rng.randrange(len(placed[account])))
            trade = {**earlier, "id": number, "kind": "CANCEL"}
        else:
            symbol = rng.choice(sorted(SYMBOLS))
            prices[symbol] = round(prices[symbol] * rng.uniform(0.98, 1.02), 2)
            trade = {
                "id": number,
                "account": account,
                "side": rng.choice(("BUY", "SELL")),
                "symbol": symbol,
                "shares": rng.randrange(10, 400) * 10,
                "price": prices[symbol],
                "kind": "PLACE",
            }
            placed[account].append(trade)
        out.append(trade)
    # The talk's workflow-event demo: shares that read "<n> shares"; the handler rejects those.
    for index in rng.sample(range(len(out)), MALFORMED):
        out[index] = {**out[index], "shares": f"{out[index]['shares']} shares"}
    return out


def payments(seed: int = 1, count: int = 200) -> list[dict[str, Any]]:
    """Card and transfer payments of orders, one per line."""
    rng = random.Random(seed)
    return [
        {
            "id": f"PAY-{number:04d}",
            "order": f"ORD-{1000 + number}",
            "account": rng.choice(ACCOUNTS),
            "amount": round(rng.uniform(5, 2500), 2),
            "currency": rng.choice(("USD", "USD", "EUR", "GBP")),
            "method": rng.choice(("card", "card", "transfer")),
        }
        for number in range(1, count + 1)
    ]


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")


if __name__ == "__main__":
    write_jsonl(HERE / "trades.jsonl", trades())
    write_jsonl(HERE / "payments.jsonl", payments())
