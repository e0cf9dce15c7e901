"""What only RabbitMQ can show: reconnects, stale delivery tags, queue types, declaration clashes."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from conftest import AMQP_URL, amqp_available, delete_queues

from runner.brokers import BrokerError, Message
from runner.brokers.amqp import AmqpBroker


@pytest.fixture
async def amqp(queue_name: str):  # type: ignore[no-untyped-def]
    amqp_available()
    broker = AmqpBroker(AMQP_URL, queue_types={f"{queue_name}.quorum": "quorum"})
    await broker.connect(10)
    yield broker
    await broker.close()
    await delete_queues([queue_name, f"{queue_name}.quorum", f"{queue_name}.clash"])


def close_all_connections() -> None:
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "--global", "edarun test"], capture_output=True, timeout=60
    )


async def test_stale_delivery_after_reconnect_is_redelivered_not_a_crash(
    amqp: AmqpBroker, queue_name: str
) -> None:
    await amqp.declare(queue_name)
    await amqp.publish(queue_name, Message(b'{"n": 1}', "m1"))
    sub = await amqp.consume(queue_name, prefetch=5)
    first = await asyncio.wait_for(sub.__anext__(), 10)
    assert not first.redelivered
    await asyncio.to_thread(close_all_connections)
    again = await asyncio.wait_for(sub.__anext__(), 30)  # the consumer is restored after reconnecting
    await first.ack()  # a tag of the dead channel: dropped, no exception, no channel error
    assert again.message_id == "m1" and again.redelivered
    await again.ack()
    await amqp.publish(queue_name, Message(b'{"n": 2}', "m2"))  # the publish channel is back too
    after = await asyncio.wait_for(sub.__anext__(), 10)
    assert after.message_id == "m2"
    await after.ack()
    await asyncio.sleep(0.2)
    depth = await amqp.depth(queue_name)
    assert (depth.ready, depth.unacked) == (0, 0)
    await sub.close()


async def test_batched_acks_with_a_nack_in_between(amqp: AmqpBroker, queue_name: str) -> None:
    await amqp.declare(queue_name)
    for n in range(6):
        await amqp.publish(queue_name, Message(str(n).encode(), f"m{n}"))
    sub = await amqp.consume(queue_name, prefetch=10)
    got = [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(6)]
    # Out of order, with a rejection in the middle: the multiple=True ack must never name the
    # rejected tag, or RabbitMQ would close the channel.
    await got[2].nack(requeue=False)
    for index in (5, 0, 3, 1, 4):
        await got[index].ack()
    await asyncio.sleep(0.3)
    depth = await amqp.depth(queue_name)
    assert (depth.ready, depth.unacked) == (0, 0)
    await amqp.publish(queue_name, Message(b"7", "m7"))
    (late,) = [await asyncio.wait_for(sub.__anext__(), 10)]
    assert late.message_id == "m7"  # the channel is still open
    await late.ack()
    await sub.close()


async def test_quorum_queue_and_a_declaration_clash(amqp: AmqpBroker, queue_name: str) -> None:
    await amqp.declare(f"{queue_name}.quorum")
    await amqp.publish(f"{queue_name}.quorum", Message(b"1", "q1"))
    assert (await amqp.depth(f"{queue_name}.quorum")).ready == 1
    other = AmqpBroker(AMQP_URL, queue_types={f"{queue_name}.clash": "quorum"})
    await other.connect(10)
    try:
        await amqp.declare(f"{queue_name}.clash")  # classic
        with pytest.raises(BrokerError, match="other settings"):
            await other.declare(f"{queue_name}.clash")  # the same name as quorum
    finally:
        await other.close()
    await amqp.declare(queue_name)  # the broker still works after the refused declaration
    assert (await amqp.depth(queue_name)).ready == 0
