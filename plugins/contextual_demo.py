"""The contextual queue pattern's orders (pattern 6): sources, handlers, and what the handlers saw.

The talk's shop sells books, music and movies, and a different service processes each kind. An order
is a dict with a `kind` (`book`, `music`, `movie`; a few others are of a kind no service knows), the
`work_ms` it takes to process (stamped by the source: a movie order is slow, a book order fast) and
`sent_at`, the wall-clock time the source handed it to the producer. Sources are pulled lazily, so
`sent_at` is when the order was published, and a handler's start minus `sent_at` is the order's
response time: the time it waited in its queue.

- `orders`: ~300 mixed orders for pipelines/contextual_queue.yaml (books 1 ms, music 2 ms, movies
  20 ms), and every fiftieth one of an unknown kind (`game`, `poster`).
- `rush`: the orders of examples/contextual_queue/run.py: a steady stream of fast book and music
  orders (5 ms) with two bursts of slow movie orders (200 ms) in it.

The handlers sleep `work_ms` (edarun runs a sync handler in a worker thread) and write each order's
wait to `journal`, which lives in this module, so an in-process run reads it afterwards.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runtime.context import Context

Event = dict[str, Any]

KINDS = ("book", "music", "movie")
TITLES = {
    "book": ("Fundamentals of Software Architecture", "Software Architecture: The Hard Parts", "Dune"),
    "music": ("Kind of Blue", "Abbey Road", "Blue Train"),
    "movie": ("The Matrix", "Inception", "Arrival"),
    "game": ("Chess Deluxe",),
    "poster": ("Event Storming Wall Chart",),
}
ORDER_MS = {"book": 1, "music": 2, "movie": 20, "game": 1, "poster": 1}  # `orders`: per kind
RUSH_MS = {"book": 5, "music": 5, "movie": 200}  # `rush`: per kind
UNKNOWN_EVERY = 50  # `orders`: every fiftieth order is of a kind no service knows
SEED = 6


def _order(number: int, kind: str, work_ms: int, rng: random.Random) -> Event:
    return {
        "id": number,
        "kind": kind,
        "item": rng.choice(TITLES[kind]),
        "quantity": rng.randrange(1, 4),
        "work_ms": work_ms,
        "sent_at": time.time(),  # stamped as the producer takes the order (sources are lazy)
    }


def orders() -> Iterator[Event]:
    """Mixed orders, endless (`count` caps it): half books, a third music, a sixth movies."""
    rng = random.Random(SEED)
    number = 0
    while True:
        number += 1
        if number % UNKNOWN_EVERY == 0:
            kind = ("game", "poster")[number // UNKNOWN_EVERY % 2]
        else:
            kind = rng.choices(KINDS, (3, 2, 1))[0]
        yield _order(number, kind, ORDER_MS[kind], rng)


RUSH_TOTAL = 240
RUSH_BURSTS = (40, 140)  # the positions where a burst of movie orders starts
RUSH_BURST = 8  # movie orders a burst


def rush() -> Iterator[Event]:
    """240 orders: book and music orders, with a burst of 8 movie orders at orders 41 and 141."""
    rng = random.Random(SEED)
    for number in range(1, RUSH_TOTAL + 1):
        in_burst = any(start < number <= start + RUSH_BURST for start in RUSH_BURSTS)
        kind = "movie" if in_burst else rng.choice(("book", "music"))
        yield _order(number, kind, RUSH_MS[kind], rng)


@dataclass
class Journal:
    """Each order's wait (handler start - `sent_at`, in seconds) by kind, from every worker thread."""

    waits: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.waits = {}

    def record(self, order: Event, started: float) -> float:
        wait = max(0.0, started - float(order.get("sent_at", started)))
        with self.lock:
            self.waits.setdefault(str(order.get("kind")), []).append(wait)
        return wait


journal = Journal()


def _process(order: Event, ctx: Context, service: str) -> None:
    wait = journal.record(order, time.time())
    time.sleep(float(order.get("work_ms", 1)) / 1000)  # the service's work
    ctx.log.debug(
        "%s: %s order %s (%s x%s) processed after waiting %.0f ms in %s",
        service, order.get("kind"), order.get("id"), order.get("item"), order.get("quantity"),
        wait * 1000, ctx.queue,
    )  # fmt: skip


def process_book(order: Event, ctx: Context) -> None:
    """The book service."""
    _process(order, ctx, "book service")


def process_music(order: Event, ctx: Context) -> None:
    """The music service."""
    _process(order, ctx, "music service")


def process_movie(order: Event, ctx: Context) -> None:
    """The movie service: its orders are the slow ones."""
    _process(order, ctx, "movie service")


def process_other(order: Event, ctx: Context) -> None:
    """Orders of a kind no service knows (the route's `default`): set aside for a person to look at."""
    journal.record(order, time.time())
    ctx.log.info("order %s of unknown kind %r set aside for review", order.get("id"), order.get("kind"))


def process_any(order: Event, ctx: Context) -> None:
    """One service for every kind, as on the shared queue before the pattern."""
    _process(order, ctx, "order service")
