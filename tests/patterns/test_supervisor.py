"""Supervisor consumer: the consumer count follows the queue depth, up at once, down when idle."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from runner.config.loader import load_pipeline
from runner.config.models import Autoscale
from runner.patterns.supervisor import wanted
from runner.runtime.app import Runner, RunOptions, queues_of
from runner.runtime.dashboard import dashboard_queue

HANDLER = """
import asyncio
import time

RUNNING = [0]
PEAK = [0]
DONE = []


async def handle(event, ctx):
    RUNNING[0] += 1
    PEAK[0] = max(PEAK[0], RUNNING[0])
    try:
        await asyncio.sleep(0.02)
    finally:
        RUNNING[0] -= 1
    DONE.append(event["id"])


async def burst(ctx):
    for i in range(1500):
        yield {"id": i}


async def two_bursts(ctx):
    for i in range(600):
        yield {"id": i}
    await asyncio.sleep(1.5)  # a pause longer than keep_alive: the supervisor scales down
    for i in range(600, 1200):
        yield {"id": i}
"""


def autoscaled(factory, mod: str, source: str, extra: str = "") -> Path:  # type: ignore[no-untyped-def]
    return factory.pipeline(
        f"""
        version: 1
        name: scaled
        plugins: [plugins]
        producers:
          feed: {{source: "{mod}:{source}", to: requests}}
        consumers:
          names:
            from: requests
            handler: "{mod}:handle"
            autoscale: depth/20 max 16 min 1 every 100ms keep_alive 500ms
            prefetch: 5
            {extra}
        """
    )


def test_the_formula() -> None:
    policy = Autoscale.model_validate("depth/20 max 16 min 2")
    assert wanted(policy, depth=0, instances=1, held=0) == 2  # min
    assert wanted(policy, depth=41, instances=1, held=0) == 3  # ceil(41/20)
    assert wanted(policy, depth=200, instances=2, held=0) == 5  # this process's share
    assert wanted(policy, depth=0, instances=1, held=60) == 3  # prefetched work counts
    assert wanted(policy, depth=10_000, instances=1, held=0) == 16  # max


async def test_a_burst_scales_up_and_everything_is_processed(  # type: ignore[no-untyped-def]
    factory, run_pipeline, broker_url
) -> None:
    mod = factory.module("burst", HANDLER)
    code, runner = await run_pipeline(autoscaled(factory, mod, "burst"))
    assert code == 0
    module = factory.imported(mod)
    stats = runner.stats.consumers["names"]
    assert stats.max_consumers >= 8, stats
    assert module.PEAK[0] >= 8  # handlers really ran side by side
    if broker_url == "memory":
        assert sorted(module.DONE) == list(range(1500))
    else:
        assert set(module.DONE) == set(range(1500))


async def test_scales_down_to_min_when_idle_and_loses_nothing(factory, broker_url) -> None:  # type: ignore[no-untyped-def]
    from conftest import delete_queues

    mod = factory.module("waves", HANDLER)
    path = autoscaled(factory, mod, "two_bursts")
    loaded = load_pipeline(path)
    names = [*queues_of(loaded), *(dashboard_queue(c) for c in loaded.model.consumers)]
    options = RunOptions(until_idle=True)
    if broker_url != "memory":
        await delete_queues(names)
        options.broker = broker_url
    runner = Runner(loaded, options)
    samples: list[int] = []

    async def sample() -> None:
        while True:
            stats = runner.stats.consumers.get("names")
            samples.append(stats.consumers if stats else 0)
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    try:
        code = await asyncio.wait_for(runner.run(), 90)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        if broker_url != "memory":
            await delete_queues(names)
    assert code == 0
    module = factory.imported(mod)
    assert set(module.DONE) == set(range(1200))
    if broker_url == "memory":
        assert len(module.DONE) == 1200  # nothing twice while scaling
    peak_first = max(samples[: len(samples) // 2])
    assert peak_first >= 4
    # Between the bursts the count went back down to min, then up again for the second burst.
    after_peak = samples[samples.index(peak_first) :]
    back_to_min = after_peak.index(1)
    assert max(after_peak[back_to_min:]) >= 4, samples  # and up again for the second burst
    assert runner.stats.consumers["names"].max_consumers >= 8


async def test_ordering_and_autoscale_together(factory, jsonl, run_pipeline) -> None:  # type: ignore[no-untyped-def]
    events = []
    counters: dict[str, int] = {}
    for i in range(600):
        account = f"A-{i % 25}"
        counters[account] = counters.get(account, 0) + 1
        events.append({"id": i, "account": account, "seq": counters[account]})
    jsonl("events.jsonl", events)
    mod = factory.module(
        "ordscale",
        """
        import asyncio
        SEEN = []

        async def handle(event, ctx):
            await asyncio.sleep(0.005)
            SEEN.append((event["account"], event["seq"], ctx.worker))
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: ordscale
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: trades}}
        consumers:
          trader:
            from: trades
            handler: "{mod}:handle"
            ordering: by_context(account)
            autoscale: depth/10 max 8 every 100ms keep_alive 300ms
        """
    )
    code, runner = await run_pipeline(path)
    assert code == 0
    seen = factory.imported(mod).SEEN
    per_account: dict[str, list[int]] = {}
    for account, seq, _ in seen:
        per_account.setdefault(account, []).append(seq)
    for account, seqs in per_account.items():
        assert seqs[: counters[account]] == list(range(1, counters[account] + 1)), account
    assert runner.stats.consumers["trader"].max_consumers > 1
