"""The merged subscription of a multi-broker (pattern 9): several brokers' subscriptions as one,
every member of the `Subscription` protocol checked across its children."""

from __future__ import annotations

import asyncio

from runner.brokers import Message
from runner.brokers.memory import MemoryBroker
from runner.brokers.merged import MergedSubscription


async def two_brokers(queue: str = "q") -> tuple[MemoryBroker, MemoryBroker]:
    a, b = MemoryBroker("memory://a"), MemoryBroker("memory://b")
    for broker in (a, b):
        await broker.declare(queue)
    return a, b


async def merged_over(a: MemoryBroker, b: MemoryBroker, prefetch: int = 10) -> MergedSubscription:
    merged = MergedSubscription("q")
    assert merged.add(a, await a.consume("q", prefetch=prefetch))
    assert merged.add(b, await b.consume("q", prefetch=prefetch))
    return merged


def msg(n: int) -> Message:
    return Message(str(n).encode(), f"m{n}")


async def test_poll_takes_from_the_children_in_turn_and_held_counts_both() -> None:
    a, b = await two_brokers()
    for n in range(3):
        await a.publish("q", msg(n))
    for n in range(10, 13):
        await b.publish("q", msg(n))
    merged = await merged_over(a, b)
    taken = [merged.poll() for _ in range(6)]
    assert [d.body for d in taken if d] == [b"0", b"10", b"1", b"11", b"2", b"12"]
    assert [d.broker for d in taken if d][:2] == ["memory://a", "memory://b"]
    assert merged.poll() is None
    assert merged.held == 6
    for delivery in taken[:4]:
        assert delivery is not None
        await delivery.ack()  # settled on the broker it came from
    assert merged.held == 2
    assert ((await a.depth("q")).unacked, (await b.depth("q")).unacked) == (1, 1)


async def test_a_busy_child_does_not_starve_the_other() -> None:
    a, b = await two_brokers()
    for n in range(50):
        await a.publish("q", msg(n))
    await b.publish("q", msg(99))
    merged = await merged_over(a, b, prefetch=100)
    first_two = [await merged.__anext__() for _ in range(2)]
    assert b"99" in [d.body for d in first_two]


async def test_anext_waits_for_either_child() -> None:
    a, b = await two_brokers()
    merged = await merged_over(a, b)
    waiting = asyncio.ensure_future(merged.__anext__())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await b.publish("q", msg(7))
    delivery = await asyncio.wait_for(waiting, 1)
    assert (delivery.body, delivery.broker) == (b"7", "memory://b")
    # Woken once, it left no listener behind on the other child: a's queue wakes no one for it.
    assert not a._queues["q"].waiting


async def test_listen_calls_back_once_whichever_child_gets_a_delivery() -> None:
    a, b = await two_brokers()
    merged = await merged_over(a, b)
    calls: list[str] = []
    merged.listen(lambda: calls.append("x"))
    await a.publish("q", msg(1))
    await b.publish("q", msg(2))
    assert calls == ["x"]  # once, not once per child
    merged.listen(lambda: calls.append("y"))
    merged.unlisten(calls.append)  # not a listener: no effect
    await b.publish("q", msg(3))
    assert calls == ["x", "y"]


async def test_unlisten_leaves_nothing_waiting_on_the_children() -> None:
    a, b = await two_brokers()
    merged = await merged_over(a, b)
    calls: list[int] = []

    def callback() -> None:
        calls.append(1)

    merged.listen(callback)
    assert a._queues["q"].waiting and b._queues["q"].waiting
    merged.unlisten(callback)
    assert not a._queues["q"].waiting and not b._queues["q"].waiting
    await a.publish("q", msg(1))
    assert calls == []


async def test_a_child_added_later_wakes_the_waiting_consumer() -> None:
    a, b = await two_brokers()
    merged = MergedSubscription("q")
    assert merged.add(a, await a.consume("q", prefetch=5))
    await b.publish("q", msg(5))  # on a broker that joins later (it was down when the consumer started)
    waiting = asyncio.ensure_future(merged.__anext__())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    late = await b.consume("q", prefetch=5)
    assert merged.add(b, late)
    assert (await asyncio.wait_for(waiting, 1)).body == b"5"
    assert not merged.add(b, late)  # one child per broker


async def test_cancel_ends_it_once_every_child_ended_and_acks_still_work() -> None:
    a, b = await two_brokers()
    await a.publish("q", msg(1))
    merged = await merged_over(a, b)
    delivery = await merged.__anext__()
    waiting = asyncio.ensure_future(merged.__anext__())
    await asyncio.sleep(0.01)
    assert not merged.ended
    await merged.cancel()
    assert merged.ended and merged.cancelled
    try:
        await asyncio.wait_for(waiting, 1)
        raise AssertionError("a cancelled subscription ended with a delivery")
    except StopAsyncIteration:
        pass
    await delivery.ack()
    assert merged.held == 0
    assert not merged.add(b, await b.consume("q", prefetch=1))  # nothing joins a cancelled one


async def test_close_gives_back_what_each_child_held_marked_redelivered() -> None:
    a, b = await two_brokers()
    await a.publish("q", msg(1))
    await b.publish("q", msg(2))
    ended: list[MergedSubscription] = []
    merged = MergedSubscription("q", on_end=ended.append)
    merged.add(a, await a.consume("q", prefetch=5))
    merged.add(b, await b.consume("q", prefetch=5))
    assert {(await merged.__anext__()).body for _ in range(2)} == {b"1", b"2"}
    await merged.close()
    assert ended == [merged]
    assert ((await a.depth("q")).ready, (await b.depth("q")).ready) == (1, 1)
    again = await a.consume("q", prefetch=1)
    redelivered = await again.__anext__()
    assert redelivered.body == b"1" and redelivered.redelivered


async def test_generation_sums_the_childrens() -> None:
    a, b = await two_brokers()

    class Reconnecting:
        """A child whose connection came back once (its earlier deliveries are stale)."""

        generation = 1
        held = 0
        ended = False

        def poll(self) -> None:
            return None

        def listen(self, callback: object) -> None: ...

        def unlisten(self, callback: object) -> None: ...

    merged = MergedSubscription("q")
    merged.add(a, await a.consume("q", prefetch=1))
    assert merged.generation == 0
    merged.add(b, Reconnecting())  # type: ignore[arg-type]
    assert merged.generation == 1
