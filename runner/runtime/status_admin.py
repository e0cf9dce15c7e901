"""`edarun status PIPELINE`: the status of a pipeline running elsewhere, heard through its broker.

Every running `edarun up` on RabbitMQ says its status on the fanout exchange `<pipeline>.status`
once a second (runtime.status). `status` listens there; after the first answer it listens one more
period, so that it hears every `up` of the pipeline (several machines with `--only`), and merges
what it heard. When no `up` answers within `--wait`, it reports what the broker itself knows: each
queue's depth and its lane's, and what waits in each consumer's dashboard. The embedded `memory`
broker lives inside one `edarun up` process, which nothing outside can reach.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from ..brokers import Broker
from ..config.loader import LoadedPipeline
from ..config.models import is_memory
from ..patterns.priority import lane_rules
from . import loop as event_loop
from .app import EXIT_INVALID, RunError, broker_urls, connect, queues_of
from .dashboard import dashboard_queue
from .status import FORMAT, STATUS_EVERY, merge, status_exchange

AFTER_FIRST = 1.3 * STATUS_EVERY  # listened after the first answer: every `up` speaks once in it
NOBODY = "no running edarun up answered"


async def read_status(
    loaded: LoadedPipeline, broker_url: str | None, timeout: float, wait: float
) -> dict[str, Any]:
    """The pipeline's status document: merged from its running `up`s, else from the broker."""
    if any(is_memory(url) for url in broker_urls(loaded, broker_url)):
        raise RunError(
            "the memory broker lives inside one `edarun up` process, which `edarun status` cannot "
            "reach (there `up` shows the status itself, `up --json` as JSON lines); status needs a "
            "broker it can reach (--broker amqp://… or broker: in the pipeline)",
            EXIT_INVALID,
        )
    broker = await connect(loaded, broker_url, timeout)
    try:
        heard = await listen(broker, loaded.model.name, wait)
        if heard:
            return merge(list(heard.values()))
        return await broker_status(broker, loaded, f"{NOBODY} within {wait:g}s: what the broker knows")
    finally:
        await broker.close()


async def listen(broker: Broker, pipeline: str, wait: float) -> dict[str, dict[str, Any]]:
    """The latest status message of each `up` heard on the pipeline's status exchange."""
    heard: dict[str, dict[str, Any]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    subscription = await broker.listen(status_exchange(pipeline))
    try:
        while (left := deadline - loop.time()) > 0:
            try:
                delivery = await asyncio.wait_for(anext(subscription), left)
            except (TimeoutError, StopAsyncIteration):
                break
            await delivery.ack()
            message = _decode(delivery.body, pipeline)
            if message is None:
                continue
            if not heard:
                deadline = min(deadline, loop.time() + AFTER_FIRST)
            heard[message["status"]["sources"][0]] = message
    finally:
        await subscription.close()
    return heard


def _decode(body: bytes, pipeline: str) -> dict[str, Any] | None:
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("format") != FORMAT:
        return None  # another version of edarun: its document may not merge with this one's
    status = message.get("status")
    if not isinstance(status, dict) or status.get("pipeline") != pipeline or not status.get("sources"):
        return None
    return message


async def broker_status(broker: Broker, loaded: LoadedPipeline, note: str) -> dict[str, Any]:
    """What the broker knows without a running `up`: depths (lanes beside their queue) and, per
    consumer, the events waiting in its dashboard."""
    model = loaded.model
    lanes = {queue: rule.lane for queue, rule in lane_rules(model).items()}
    queues: dict[str, dict[str, Any]] = {}
    for queue in queues_of(loaded):
        if queue in lanes.values():
            continue
        depth = await broker.depth(queue)
        entry: dict[str, Any] = {"depth": depth.ready}
        complete = depth.complete
        if queue in lanes:
            lane = await broker.depth(lanes[queue])
            entry["lane_depth"] = lane.ready
            complete = complete and lane.complete
        if not complete:
            entry["complete"] = False  # a broker of several did not answer: at least this many
        queues[queue] = entry
    consumers: dict[str, dict[str, Any]] = {}
    for name, spec in model.consumers.items():
        parked = await broker.depth(dashboard_queue(name))
        consumers[name] = {"queue": spec.from_, "parked": parked.ready}
    return {
        "pipeline": model.name,
        "from": "broker",
        "note": note,
        "sources": [],
        "at": round(time.time(), 3),
        "brokers": list(broker.urls),
        "producers": {},
        "queues": queues,
        "consumers": consumers,
        "parked": sum(c["parked"] for c in consumers.values()),
    }


def run_status(loaded: LoadedPipeline, broker_url: str | None, timeout: float, wait: float) -> dict[str, Any]:
    """`edarun status`: the document to print. Raises RunError (memory: 2, unreachable: 1)."""
    return event_loop.run(read_status(loaded, broker_url, timeout, wait))
