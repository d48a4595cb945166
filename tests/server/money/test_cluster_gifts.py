"""Gifts on a real Redis Cluster (3 masters, 3 replicas): the sender's shard settles, the
creator's shard is credited once by Crediting, the room's event lands on the creator's shard,
a take whose replicas do not ack holds back, and a sender shard's master killed -9 mid-run
never leaves a creator credited for a gift its ledger lost, nor credited twice."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from giftstream.server.metrics import Metrics
from giftstream.server.money.catalog import Economics, Gift
from giftstream.server.money.crediting import Crediting
from giftstream.server.money.keys import KeySpace
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import GiftRoom, SettledGift, Wallet
from tests.cluster import RedisClusterProcesses
from tests.server.money.cluster_money import check_credited_once, user_in

SPACE = KeySpace(cluster=True, partitions=4)
ROSE = Gift(id="rose", name="Rose", coins=5, animation="petals")
ECONOMICS = Economics()
DEADLINE_S = 60.0


@pytest.fixture
async def rc(cluster_url: str, redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    redis_cluster.wait_ok()  # every replica in sync: a WAIT for it can be met
    client = RedisCluster.from_url(cluster_url)
    yield client
    await client.aclose()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def wallet(rc: RedisCluster, metrics: Metrics) -> AsyncIterator[Wallet]:
    money = Wallet(rc, ECONOMICS, keyspace=SPACE, metrics=metrics, payout_hold_days=7)
    await money.load_scripts()
    yield money
    await money.drain()


async def fund(rc: RedisCluster, user: str, coins: int) -> None:
    """Coins put straight in the wallet: purchases on a cluster are another helper's part."""
    await rc.hset(SPACE.wallet(user), "coins", coins)


async def gift(
    wallet: Wallet, sender: str, creator: str, key: str, in_room: GiftRoom | None = None
) -> SettledGift:
    """Two roses (10 coins, 5 diamonds) in the creator's room, key `gift-key-<key>`."""
    return await wallet.send_gift(
        sender=sender,
        adult=True,
        creator=creator,
        room=creator,
        gift=ROSE,
        count=2,
        key=f"gift-key-{key}",
        in_room=in_room,
    )


def room_of(creator: str, log: bool = True) -> GiftRoom:
    return GiftRoom(
        record=SPACE.room(creator),
        log=SPACE.room_log(creator) if log else "",
        room_json=json.dumps(creator).encode(),
        sender_json=b'{"id":"ann","name":"Ann"}',
        gift_json=json.dumps(ROSE.as_wire(), separators=(",", ":")).encode(),
        log_size=100,
    )


async def credited_all(*runners: Crediting, creators: list[str]) -> Counter[str]:
    """Rounds (the runners racing) until every gift is credited once; the check's diamonds."""
    deadline = time.monotonic() + DEADLINE_S
    for _ in range(1000):
        await asyncio.gather(*(runner.round() for runner in runners))
        try:
            return await check_credited_once(runners[0]._redis, SPACE, creators)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    raise AssertionError("not all credited within 1000 rounds")


async def test_gift_debits_sender_and_credits_creator_once(
    rc: RedisCluster, wallet: Wallet, metrics: Metrics
) -> None:
    sender, creator = user_in(SPACE, 0, "ann"), user_in(SPACE, 3, "cara")
    await fund(rc, sender, 100)
    settled = await gift(wallet, sender, creator, "k1")
    assert settled.coins == 90 and not settled.replayed
    assert await rc.hget(SPACE.wallet(sender), "coins") == b"90"
    ledger: Any = await rc.xrange(SPACE.ledger(0))
    [(_, fields)] = ledger
    entry = json.loads(fields[b"data"])
    assert (entry["kind"], entry["sender"], entry["creator"], entry["diamonds"]) == (
        "gift",
        sender,
        creator,
        5,
    )
    assert await rc.hget(SPACE.wallet(creator), "diamonds") is None  # not yet: crediting
    crediting = Crediting(rc, SPACE, metrics)
    assert await crediting.round() == 1
    assert await crediting.round() == 0
    assert await rc.hget(SPACE.wallet(creator), "diamonds") == b"5"
    assert sum(int(v) for v in (await rc.hgetall(SPACE.held(creator))).values()) == 5
    replay = await gift(wallet, sender, creator, "k1")
    assert replay.replayed and replay.coins == 90
    assert await crediting.round() == 0
    await check_credited_once(rc, SPACE, [creator])
    assert metrics.credits_applied._value.get() == 1


async def test_room_event_lands_on_the_creators_shard_with_its_seq(
    rc: RedisCluster, wallet: Wallet
) -> None:
    sender, creator = user_in(SPACE, 1, "ann"), user_in(SPACE, 2, "cara")
    await fund(rc, sender, 100)
    await rc.hset(SPACE.room(creator), mapping={"live": "1", "seq": 4})
    settled = await gift(wallet, sender, creator, "k1", in_room=room_of(creator))
    assert await Crediting(rc, SPACE).round() == 1
    log: Any = await rc.xrange(SPACE.room_log(creator))
    [(entry_id, fields)] = log
    assert entry_id == b"0-5" and fields[b"t"] == b"gift"
    expected = (
        f'{{"type":"gift","room":"{creator}","seq":5,"event":"{settled.event}",'
        '"sender":{"id":"ann","name":"Ann"},'
        '"gift":{"id":"rose","name":"Rose","coins":5,"animation":"petals"},'
        f'"count":2,"combo":1,"ts":{settled.ts}}}'
    )
    assert fields[b"d"].decode() == expected
    assert await rc.hget(SPACE.room(creator), "seq") == b"5"


async def test_a_room_not_live_is_refused_before_the_script(
    rc: RedisCluster, wallet: Wallet
) -> None:
    sender, creator = user_in(SPACE, 0, "ann"), user_in(SPACE, 1, "cara")
    await fund(rc, sender, 100)
    with pytest.raises(Refusal) as refused:
        await gift(wallet, sender, creator, "k1", in_room=room_of(creator))
    assert refused.value.reason is Reason.ROOM_NOT_LIVE
    assert await rc.hget(SPACE.wallet(sender), "coins") == b"100"


async def test_two_runners_at_once_never_credit_twice(
    rc: RedisCluster, wallet: Wallet, metrics: Metrics
) -> None:
    senders = [user_in(SPACE, p, "ann") for p in range(4)]
    creators = [user_in(SPACE, p, "cara") for p in range(4)]
    for sender in senders:
        await fund(rc, sender, 10_000)
    runners = [Crediting(rc, SPACE, metrics, batch=3), Crediting(rc, SPACE, metrics, batch=3)]
    n = 0
    for _ in range(6):
        for sender in senders:
            for creator in creators:
                n += 1
                await gift(wallet, sender, creator, f"k{n}")
        await asyncio.gather(runners[0].round(), runners[1].round())
    total = await credited_all(*runners, creators=creators)
    assert sum(total.values()) == n * 5
    assert metrics.credits_applied._value.get() == n  # each gift credited by one runner once


async def test_a_take_its_replicas_do_not_ack_is_held_back(
    rc: RedisCluster, wallet: Wallet, metrics: Metrics, redis_cluster: RedisClusterProcesses
) -> None:
    sender, creator = user_in(SPACE, 2, "ann"), user_in(SPACE, 0, "cara")
    await fund(rc, sender, 100)
    await gift(wallet, sender, creator, "k1")
    crediting = Crediting(rc, SPACE, metrics, wait_timeout_ms=200)
    master = redis_cluster.node_of(rc, SPACE.credit_take_marker(2))
    [replica] = redis_cluster.replicas_of(master)
    await credited_all(crediting, creators=[creator])  # learns the shard's replicas meanwhile
    await gift(wallet, sender, creator, "k2")
    with replica.frozen():
        assert await crediting.round() == 0
    assert metrics.credit_wait_holdbacks._value.get() >= 1
    assert await rc.hget(SPACE.wallet(creator), "diamonds") == b"5"
    await credited_all(crediting, creators=[creator])


async def test_durable_ack_waits_for_the_senders_replica(
    rc: RedisCluster, metrics: Metrics, redis_cluster: RedisClusterProcesses
) -> None:
    durable = Wallet(
        rc, ECONOMICS, keyspace=SPACE, metrics=metrics, durable_ack=True, durable_ack_timeout_ms=300
    )
    await durable.load_scripts()
    sender, creator = user_in(SPACE, 3, "ann"), user_in(SPACE, 1, "cara")
    await fund(rc, sender, 100)
    await gift(durable, sender, creator, "k1")
    assert metrics.durable_ack_short._value.get() == 0
    [replica] = redis_cluster.replicas_of(redis_cluster.node_of(rc, SPACE.wallet(sender)))
    with replica.frozen():
        started = time.monotonic()
        settled = await gift(durable, sender, creator, "k2")
        assert time.monotonic() - started >= 0.25  # it waited for the replica
    assert settled.coins == 80  # settled all the same
    assert metrics.durable_ack_short._value.get() == 1


async def test_more_gifts_at_once_than_a_nodes_connections_all_settle(
    rc: RedisCluster, wallet: Wallet
) -> None:
    """redis-py's cluster pool raises MaxConnectionsError past its per-node cap (100 here, the
    client's default) instead of waiting: 300 gifts at once, all to one shard, must queue in
    the wallet, not fail."""
    senders = [f"many{n}" for n in range(3000) if SPACE.partition(f"many{n}") == 1][:300]
    creator = user_in(SPACE, 2, "cara")
    for sender in senders:
        await fund(rc, sender, 10)
    settled = await asyncio.gather(*(gift(wallet, s, creator, "many") for s in senders))
    assert [g.coins for g in settled] == [0] * len(senders)


async def test_a_durable_replay_waits_for_the_replicas_too(
    rc: RedisCluster, metrics: Metrics, redis_cluster: RedisClusterProcesses
) -> None:
    """A replay's answer must not outrun the first settlement's replication either: a durable
    replay waits too (it is not answered from the key record alone). Redis documents WAIT as
    covering its own connection's writes, and a replay writes nothing, so the durable mark
    written before the WAIT is what makes it cover the settlement on any Redis (7.0 here
    waits on the master's whole offset, mark or not)."""
    durable = Wallet(
        rc, ECONOMICS, keyspace=SPACE, metrics=metrics, durable_ack=True, durable_ack_timeout_ms=300
    )
    await durable.load_scripts()
    sender, creator = user_in(SPACE, 3, "bo"), user_in(SPACE, 1, "cara")
    await fund(rc, sender, 100)
    first = await gift(durable, sender, creator, "k1")
    assert metrics.durable_ack_short._value.get() == 0
    [replica] = redis_cluster.replicas_of(redis_cluster.node_of(rc, SPACE.wallet(sender)))
    with replica.frozen():
        again = await gift(durable, sender, creator, "k1")
    assert again.replayed and again.event == first.event
    assert metrics.durable_ack_short._value.get() == 1  # it did wait, in vain, for the replica


async def test_a_sender_shard_failover_credits_no_lost_gift_and_none_twice(
    rc: RedisCluster, wallet: Wallet, redis_cluster: RedisClusterProcesses
) -> None:
    senders = [user_in(SPACE, p, "ann") for p in range(4)]
    creators = [user_in(SPACE, p, "cara") for p in range(4)]
    for sender in senders:
        await fund(rc, sender, 1_000_000)
    crediting = Crediting(rc, SPACE)
    wallet.on_credit_due = crediting.poke
    stop = asyncio.Event()
    runner = asyncio.create_task(crediting.run(stop))
    victim = redis_cluster.node_of(rc, SPACE.wallet(senders[0]))
    n, failed = 0, 0

    async def some_gifts(count: int) -> None:
        nonlocal n, failed
        for _ in range(count):
            n += 1
            sender, creator = senders[n % 4], creators[(n // 4) % 4]
            try:
                await gift(wallet, sender, creator, f"k{n}")
            except (RedisError, OSError):
                failed += 1  # the shard is failing over: a client would retry its key

    await some_gifts(40)
    killing = asyncio.create_task(asyncio.to_thread(redis_cluster.kill_master, victim))
    deadline = time.monotonic() + DEADLINE_S * 2
    for _ in range(10_000):  # gifts go on while the master dies and its replica takes over
        if killing.done() or time.monotonic() > deadline:
            break
        await some_gifts(4)
    killed, _promoted = await killing
    try:
        await some_gifts(40)
        stop.set()
        await runner
        await credited_all(crediting, creators=creators)
    finally:
        stop.set()
        await asyncio.to_thread(redis_cluster.restart, killed)
