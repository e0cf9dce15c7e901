"""The broker protocol's delivery semantics, on every broker: FIFO, prefetch, ack, nack, requeue."""

from __future__ import annotations

import asyncio

import pytest

from runner.brokers import Broker, BrokerError, Message


def msg(n: int) -> Message:
    return Message(body=str(n).encode(), message_id=f"m{n}", headers={"n": n})


async def take(sub, count: int, timeout: float = 5.0) -> list:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(count):
        out.append(await asyncio.wait_for(sub.__anext__(), timeout))
    return out


async def nothing_more(sub, wait: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    try:
        await asyncio.wait_for(sub.__anext__(), wait)
    except TimeoutError:
        return True
    return False


async def test_fifo_and_ack(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    for n in range(5):
        await broker.publish(queue_name, msg(n))
    assert (await broker.depth(queue_name)).ready == 5
    sub = await broker.consume(queue_name, prefetch=10)
    got = await take(sub, 5)
    assert [d.body for d in got] == [b"0", b"1", b"2", b"3", b"4"]
    assert [d.message_id for d in got] == ["m0", "m1", "m2", "m3", "m4"]
    assert got[0].headers["n"] == 0 and not got[0].redelivered
    depth = await broker.depth(queue_name)
    assert (depth.ready, depth.unacked) == (0, 5)
    for d in got:
        await d.ack()
    depth = await broker.depth(queue_name)
    assert (depth.ready, depth.unacked) == (0, 0)
    await sub.close()


async def test_prefetch_limits_unacked(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    for n in range(10):
        await broker.publish(queue_name, msg(n))
    sub = await broker.consume(queue_name, prefetch=3)
    first = await take(sub, 3)
    assert await nothing_more(sub)
    assert (await broker.depth(queue_name)).ready == 7
    await first[0].ack()
    (fourth,) = await take(sub, 1)
    assert fourth.body == b"3"
    await sub.close()


async def test_nack_requeue_marks_redelivered_and_keeps_position(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    for n in range(3):
        await broker.publish(queue_name, msg(n))
    sub = await broker.consume(queue_name, prefetch=1)
    (first,) = await take(sub, 1)
    await first.nack(requeue=True)
    (again,) = await take(sub, 1)
    assert again.body == b"0" and again.redelivered
    await again.ack()
    (second,) = await take(sub, 1)
    assert second.body == b"1" and not second.redelivered
    await second.ack()
    await sub.close()


async def test_nack_without_requeue_removes(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    await broker.publish(queue_name, msg(1))
    sub = await broker.consume(queue_name, prefetch=1)
    (d,) = await take(sub, 1)
    await d.nack(requeue=False)
    depth = await broker.depth(queue_name)
    assert depth.total == 0
    await sub.close()


async def test_close_returns_unacked_marked(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    for n in range(4):
        await broker.publish(queue_name, msg(n))
    sub = await broker.consume(queue_name, prefetch=2)
    held = await take(sub, 2)
    await held[0].ack()
    await sub.close()
    other = await broker.consume(queue_name, prefetch=10)
    got = await take(other, 3)
    assert [d.body for d in got] == [b"1", b"2", b"3"]
    # "1" was handed out; "2" may have reached the closed consumer's prefetch buffer too (on
    # RabbitMQ), which also counts as a delivery: only "3" is certainly fresh.
    assert got[0].redelivered and not got[2].redelivered
    for d in got:
        await d.ack()
    await other.close()


async def test_cancel_stops_delivery_but_keeps_handed_out(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    for n in range(3):
        await broker.publish(queue_name, msg(n))
    sub = await broker.consume(queue_name, prefetch=1)
    (d,) = await take(sub, 1)
    await sub.cancel()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(sub.__anext__(), 1)
    await d.ack()  # still acknowledgeable after cancel
    depth = await broker.depth(queue_name)
    assert (depth.ready, depth.unacked) == (2, 0)
    await sub.close()


async def test_consumers_share_a_queue(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    a = await broker.consume(queue_name, prefetch=1)
    b = await broker.consume(queue_name, prefetch=1)
    for n in range(2):
        await broker.publish(queue_name, msg(n))
    (da,) = await take(a, 1)
    (db,) = await take(b, 1)
    assert {da.body, db.body} == {b"0", b"1"}
    await da.ack()
    await db.ack()
    await a.close()
    await b.close()


async def test_waiting_consumer_wakes_on_publish(broker: Broker, queue_name: str) -> None:
    await broker.declare(queue_name)
    sub = await broker.consume(queue_name, prefetch=5)
    pending = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0.05)
    assert not pending.done()
    await broker.publish(queue_name, msg(7))
    d = await asyncio.wait_for(pending, 5)
    assert d.body == b"7"
    await d.ack()
    await sub.close()


async def test_unroutable_publish_fails(broker: Broker, queue_name: str) -> None:
    with pytest.raises(BrokerError):
        await broker.publish(queue_name + ".missing", msg(1))
