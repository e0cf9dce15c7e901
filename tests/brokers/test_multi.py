"""The multi-broker (pattern 9): spreading, a broker that goes down and comes back, merged consumers,
summed depths. The first tests use embedded brokers, one of which can be taken down; the last run
on two embedded brokers and on RabbitMQ with a second node of the session's own."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import pytest
from conftest import AMQP_URL, delete_queues

from runner.brokers import BrokerError, BrokerUnavailable, Message, connect_urls, spread_key
from runner.brokers import multi as multi_module
from runner.brokers.memory import MemoryBroker
from runner.brokers.multi import MultiBroker


def event(n: int, account: str | None = None) -> Message:
    body = {"n": n} if account is None else {"n": n, "account": account}
    return Message(json.dumps(body).encode(), f"m{n}")


async def brokers(count: int = 2, spread_by: str | None = None) -> tuple[MultiBroker, list[MemoryBroker]]:
    members = [MemoryBroker(f"memory://{name}") for name in "abcdefgh"[:count]]
    multi = MultiBroker(members, spread_by=spread_by)
    await multi.connect(1.0)
    await multi.declare("q")
    return multi, members


async def ready_on(broker: MemoryBroker, queue: str = "q") -> int:
    return len(broker._queues[queue].ready)


async def settle() -> None:
    """Let a broker that came back rejoin (its join task runs on the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- spreading -------------------------------------------------------------------------------------


async def test_round_robin_spreads_evenly_and_skips_a_broker_that_is_down() -> None:
    multi, (a, b) = await brokers()
    taken = Counter([await multi.publish("q", event(n)) for n in range(10)])
    assert taken == {"memory://a": 5, "memory://b": 5}
    a.go_down()
    assert multi.ready == [b]
    taken = Counter([await multi.publish("q", event(n)) for n in range(10, 16)])
    assert taken == {"memory://b": 6}
    a.come_back()
    await settle()
    assert multi.ready == [a, b]  # rejoined for new publishes
    taken = Counter([await multi.publish("q", event(n)) for n in range(16, 20)])
    assert taken == {"memory://a": 2, "memory://b": 2}
    assert (await ready_on(a), await ready_on(b)) == (7, 13)  # nothing lost while it was down
    await multi.close()


async def test_by_context_is_stable_and_only_the_down_brokers_contexts_move() -> None:
    multi, members = await brokers(3, spread_by="account")
    contexts = [f"A-{i}" for i in range(300)]

    async def homes() -> dict[str, str]:
        return {c: await multi.publish("q", event(0, c)) for c in contexts}

    before = await homes()
    assert await homes() == before  # stable
    assert set(Counter(before.values())) == {"memory://a", "memory://b", "memory://c"}
    assert min(Counter(before.values()).values()) > 60  # roughly even
    members[1].go_down()
    during = await homes()
    moved = {c for c in contexts if during[c] != before[c]}
    assert moved == {c for c in contexts if before[c] == "memory://b"}  # its contexts, and only them
    assert "memory://b" not in during.values()
    assert {during[c] for c in moved} == {"memory://a", "memory://c"}  # spread over the others
    members[1].come_back()
    await settle()
    assert await homes() == before  # and back once it returns
    await multi.close()


async def test_the_same_context_lands_on_the_same_broker_in_another_process() -> None:
    """The ranking depends on the brokers' URLs alone: every producer process agrees."""
    first, _ = await brokers(2, spread_by="account")
    second = MultiBroker([MemoryBroker("memory://b"), MemoryBroker("memory://a")], spread_by="account")
    await second.connect(1.0)
    await second.declare("q")
    for n in range(50):
        message = event(n, f"C-{n}")
        assert await first.publish("q", message) == await second.publish("q", message)
    await first.close()
    await second.close()


async def test_the_publishers_key_saves_decoding_and_events_without_a_context_go_round() -> None:
    multi, _ = await brokers(2, spread_by="account")
    home = await multi.publish("q", event(1, "K"))
    key = spread_key({"account": "K"}, "account")
    assert key == b'"K"'
    # The key given with the message decides, whatever the body says (it is not read again).
    assert await multi.publish("q", Message(b"not json", "x", key=key)) == home
    assert spread_key({"account": {"nested": 1}}, "account") == b""
    assert spread_key({"order": {"account": 7}}, "order.account") == b"7"
    unkeyed = Counter([await multi.publish("q", event(n)) for n in range(10)])  # no account: turns
    assert unkeyed == {"memory://a": 5, "memory://b": 5}
    await multi.close()


# -- a broker going down -------------------------------------------------------------------------------


class Stalling(MemoryBroker):
    """An embedded broker whose publishes wait for a confirm: going down fails those in flight."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.stall = False
        self.in_flight: list[asyncio.Future[None]] = []

    async def publish(self, queue: str, message: Message) -> str:
        if self.stall:
            confirm = asyncio.get_running_loop().create_future()
            self.in_flight.append(confirm)
            await confirm
        return await super().publish(queue, message)

    def go_down(self) -> None:
        super().go_down()
        for confirm in self.in_flight:
            if not confirm.done():
                confirm.set_exception(BrokerUnavailable(f"{self.url} went down before it confirmed"))


async def test_a_publish_cut_off_by_an_outage_is_sent_to_another_broker() -> None:
    a, b = Stalling("memory://a"), MemoryBroker("memory://b")
    multi = MultiBroker([a, b], spread_by="account")
    await multi.connect(1.0)
    await multi.declare("q")
    context = next(f"X{i}" for i in range(100) if multi._ranking(f'"X{i}"'.encode())[0] == 0)  # a's
    a.stall = True
    publishes = [asyncio.ensure_future(multi.publish("q", event(n, context))) for n in range(1, 4)]
    await asyncio.sleep(0.01)
    assert not any(p.done() for p in publishes)  # awaiting a's confirm
    a.go_down()
    assert await asyncio.wait_for(asyncio.gather(*publishes), 1) == [b.url] * 3
    sub = await b.consume("q", prefetch=10)
    assert [json.loads(d.body)["n"] for d in [await sub.__anext__() for _ in range(3)]] == [1, 2, 3]
    await multi.close()


async def test_with_every_broker_down_a_publish_waits_for_one_to_return() -> None:
    multi, (a, b) = await brokers()
    a.go_down()
    b.go_down()
    publish = asyncio.ensure_future(multi.publish("q", event(1)))
    await asyncio.sleep(0.05)
    assert not publish.done()
    b.come_back()
    assert await asyncio.wait_for(publish, 2) == "memory://b"
    assert await ready_on(b) == 1
    await multi.close()


async def test_a_publish_gives_up_when_no_broker_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi_module, "GIVE_UP_S", 0.1)
    monkeypatch.setattr(multi_module, "RETRY_S", 0.05)
    multi, (a, b) = await brokers()
    a.go_down()
    b.go_down()
    with pytest.raises(BrokerError, match="no broker"):
        await multi.publish("q", event(1))
    await multi.close()


async def test_depth_sums_the_brokers_and_is_incomplete_while_one_is_down() -> None:
    multi, (_, b) = await brokers()
    for n in range(5):
        await multi.publish("q", event(n))
    depth = await multi.depth("q")
    assert (depth.ready, depth.unacked, depth.complete) == (5, 0, True)
    b.go_down()
    depth = await multi.depth("q")
    assert (depth.ready, depth.complete) == (3, False)  # b's two are not lost, only not counted
    b.come_back()
    await settle()
    assert (await multi.depth("q")).complete
    await multi.close()


async def test_depth_never_waits_long_for_a_silent_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi_module, "DEPTH_TIMEOUT_S", 0.05)

    class Hanging(MemoryBroker):
        async def depth(self, queue: str):  # type: ignore[no-untyped-def]
            await asyncio.Event().wait()  # a half-dead connection: no answer, no error

    multi = MultiBroker([MemoryBroker("memory://a"), Hanging("memory://b")])
    await multi.connect(1.0)
    await multi.declare("q")
    depth = await asyncio.wait_for(multi.depth("q"), 1)
    assert not depth.complete
    await multi.close()


async def test_a_consumer_started_while_a_broker_was_down_reads_it_once_back() -> None:
    multi, (a, b) = await brokers()
    await b.publish("q", event(1))  # held by b when it goes down
    b.go_down()
    sub = await multi.consume("q", prefetch=10)
    assert set(sub.children) == {a}
    waiting = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    b.come_back()
    delivery = await asyncio.wait_for(waiting, 1)
    assert (delivery.body, delivery.broker) == (event(1).body, "memory://b")
    assert set(sub.children) == {a, b}
    await delivery.ack()
    await sub.close()
    await multi.close()


async def test_a_consumer_opened_while_a_broker_rejoins_gets_it_too() -> None:
    class SlowToDeclare(MemoryBroker):
        """Its queues come back slowly after an outage: a consumer starts meanwhile."""

        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.hold = asyncio.Event()
            self.hold.set()

        async def declare(self, queue: str, *, expires: float | None = None) -> None:
            await self.hold.wait()
            await super().declare(queue, expires=expires)

    a, b = MemoryBroker("memory://a"), SlowToDeclare("memory://b")
    multi = MultiBroker([a, b])
    await multi.connect(1.0)
    await multi.declare("q")
    b.go_down()
    b.hold.clear()
    b.come_back()  # its join waits in declare
    await settle()
    sub = await multi.consume("q", prefetch=10)
    assert set(sub.children) == {a} and b not in multi.ready
    b.hold.set()
    await settle()
    assert set(sub.children) == {a, b} and b in multi.ready  # the join opened the late consumer's too
    await b.publish("q", event(1))
    assert (await asyncio.wait_for(sub.__anext__(), 1)).broker == "memory://b"
    await sub.close()
    await multi.close()


async def test_a_subscription_pauses_while_its_broker_is_down() -> None:
    multi, (_, b) = await brokers()
    sub = await multi.consume("q", prefetch=10)
    b.go_down()
    with pytest.raises(BrokerUnavailable):  # a down broker takes nothing
        await b.publish("q", event(1))
    assert await multi.publish("q", event(2)) == "memory://a"
    assert (await sub.__anext__()).broker == "memory://a"
    await sub.close()
    await multi.close()


async def test_the_consumer_window_is_shared_between_the_brokers() -> None:
    multi, _ = await brokers()
    sub = await multi.consume("q", prefetch=10)
    assert [child.prefetch for child in sub.children.values()] == [5, 5]  # type: ignore[attr-defined]
    await sub.close()
    await multi.close()


async def test_broadcast_reaches_listeners_of_every_broker_even_with_one_down() -> None:
    multi, (a, b) = await brokers()
    listener = await multi.listen("q.control")
    await multi.broadcast("q.control", Message(b'{"state": "slow"}', "w1"))
    assert (await asyncio.wait_for(listener.__anext__(), 1)).body == b'{"state": "slow"}'
    a.go_down()
    await multi.broadcast("q.control", Message(b'{"state": "normal"}', "w2"))
    word = await asyncio.wait_for(listener.__anext__(), 1)
    assert (word.body, word.broker) == (b'{"state": "normal"}', "memory://b")
    assert listener.poll() is None  # said once, not once per broker
    b.go_down()
    with pytest.raises(BrokerError):
        await multi.broadcast("q.control", Message(b"{}", "w3"))
    await listener.close()
    await multi.close()


async def test_it_starts_without_a_broker_that_does_not_answer_and_joins_it_later() -> None:
    class Unreachable(MemoryBroker):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.refuse = True

        async def connect(self, timeout: float) -> None:
            if self.refuse:
                raise BrokerError("connection refused")

    late = Unreachable("memory://b")
    multi = MultiBroker([MemoryBroker("memory://a"), late])
    await multi.connect(1.0)
    await multi.declare("q")
    assert [m.url for m in multi.ready] == ["memory://a"]
    assert not (await multi.depth("q")).complete  # it may hold events of the queue
    late.refuse = False
    await asyncio.sleep(multi_module.RETRY_S + 0.2)
    assert [m.url for m in multi.ready] == ["memory://a", "memory://b"]
    assert "q" in late._queues  # its queues were declared before it took publishes
    await multi.close()

    nobody = MultiBroker([Unreachable("memory://x"), Unreachable("memory://y")])
    with pytest.raises(BrokerError, match="no broker"):
        await nobody.connect(1.0)
    await nobody.close()


# -- on two real brokers: memory://a + memory://b, and RabbitMQ + a second node ----------------------


@pytest.fixture
async def multi(multi_urls: list[str], queue_name: str) -> AsyncIterator[MultiBroker]:
    broker = connect_urls(multi_urls, spread_by="account")
    await broker.connect(10.0)
    assert isinstance(broker, MultiBroker)
    yield broker
    await broker.close()
    if multi_urls[0] == AMQP_URL:
        for url in multi_urls:
            await delete_queues([queue_name], url)


async def test_round_robin_halves_and_a_consumer_reads_both(multi: MultiBroker, queue_name: str) -> None:
    multi.spread_by = None
    await multi.declare(queue_name)
    taken = Counter([await multi.publish(queue_name, event(n)) for n in range(200)])
    assert taken == {url: 100 for url in multi.urls}
    for member in multi.members:
        assert (await member.depth(queue_name)).ready == 100  # on the broker itself, before consuming
    assert (await multi.depth(queue_name)).ready == 200
    sub = await multi.consume(queue_name, prefetch=50)
    seen: Counter[str] = Counter()
    for _ in range(200):
        delivery = await asyncio.wait_for(sub.__anext__(), 10)
        seen[delivery.broker] += 1
        await delivery.ack()
    assert seen == taken
    await sub.close()


async def test_by_context_keeps_a_context_on_one_broker(multi: MultiBroker, queue_name: str) -> None:
    await multi.declare(queue_name)
    for n in range(300):
        await multi.publish(queue_name, event(n, f"acct-{n % 12}"))
    sub = await multi.consume(queue_name, prefetch=100)
    order: dict[str, list[int]] = defaultdict(list)
    where: dict[str, set[str]] = defaultdict(set)
    for _ in range(300):
        delivery = await asyncio.wait_for(sub.__anext__(), 10)
        body = json.loads(delivery.body)
        order[body["account"]].append(body["n"])
        where[body["account"]].add(delivery.broker)
        await delivery.ack()
    assert all(len(brokers) == 1 for brokers in where.values())
    assert {b for brokers in where.values() for b in brokers} == set(multi.urls)  # both used
    assert all(ns == sorted(ns) for ns in order.values())
    await sub.close()
