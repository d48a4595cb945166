"""The leaderboards on a real Redis Cluster: counted by credit.lua with the creator's credit,
on the creator's shard, exactly once (a replayed key and racing runners count nothing twice);
creators_day merges every partition's board."""

from __future__ import annotations

import asyncio

import orjson
from redis.asyncio.cluster import RedisCluster

from giftstream.server.money.boards import Board, Entry
from giftstream.server.money.crediting import Crediting
from giftstream.server.money.wallet import GiftRoom, Wallet
from giftstream.server.scripts import register
from tests.server.money.cluster_money import user_in
from tests.server.money.test_cluster_gifts import (
    ROSE,
    SPACE,
    credited_all,
    fund,
    rc,  # noqa: F401 (fixtures)
    wallet,  # noqa: F401
)
from tests.server.money.test_cluster_gifts import (
    metrics as metrics,
)


def table(entries: list[Entry]) -> list[tuple[int, str, str, int]]:
    return [(e.rank, e.user, e.name, e.coins) for e in entries]


def room_of(creator: str, sender: str) -> GiftRoom:
    return GiftRoom(
        record=SPACE.room(creator),
        log=SPACE.room_log(creator),
        room_json=orjson.dumps(creator),
        sender_json=orjson.dumps({"id": sender, "name": sender.title()}),
        gift_json=orjson.dumps(ROSE.as_wire()),
        log_size=100,
        name_json=orjson.dumps(sender.title()),
    )


async def test_boards_right_after_crediting_exactly_once(
    rc: RedisCluster,  # noqa: F811
    wallet: Wallet,  # noqa: F811
) -> None:
    senders = [user_in(SPACE, p, "ann") for p in range(3)]
    cara, dan = user_in(SPACE, 3, "cara"), user_in(SPACE, 1, "dan")
    for creator, name in ((cara, "Cara"), (dan, "")):
        await rc.hset(
            SPACE.room(creator),
            mapping={"live": "1", "started": 0, "creator_name": orjson.dumps(name) if name else ""},
        )
    for sender in senders:
        await fund(rc, sender, 1000)
    counts = {senders[0]: 3, senders[1]: 1, senders[2]: 2}
    for sender, count in counts.items():
        await wallet.send_gift(
            sender=sender,
            adult=True,
            creator=cara,
            room=cara,
            gift=ROSE,
            count=count,
            key=f"gift-key-{sender}",
            in_room=room_of(cara, sender),
        )
    await wallet.send_gift(  # a replay: counts nothing
        sender=senders[0],
        adult=True,
        creator=cara,
        room=cara,
        gift=ROSE,
        count=3,
        key=f"gift-key-{senders[0]}",
        in_room=room_of(cara, senders[0]),
    )
    await wallet.send_gift(
        sender=senders[1],
        adult=True,
        creator=dan,
        room=dan,
        gift=ROSE,
        count=20,
        key="gift-key-to-dan",
        in_room=room_of(dan, senders[1]),
    )
    assert await wallet.boards.top(Board.SESSION, cara) == []  # not credited yet
    runners = [Crediting(rc, SPACE), Crediting(rc, SPACE)]
    await credited_all(*runners, creators=[cara, dan])
    await asyncio.gather(*(runner.round() for runner in runners))  # nothing left to count
    expected = [
        (1, senders[0], senders[0].title(), 15),
        (2, senders[2], senders[2].title(), 10),
        (3, senders[1], senders[1].title(), 5),
    ]
    assert table(await wallet.boards.top(Board.SESSION, cara)) == expected
    assert table(await wallet.boards.top(Board.WEEK, cara)) == expected
    assert table(await wallet.boards.leaders(cara)) == expected
    assert table(await wallet.boards.top(Board.CREATORS_DAY, None)) == [
        (1, dan, dan, 100),
        (2, cara, "Cara", 30),
    ]


async def test_a_gift_credited_after_its_room_reopened_is_not_on_the_new_session(
    rc: RedisCluster,  # noqa: F811
    wallet: Wallet,  # noqa: F811
) -> None:
    sender, cara = user_in(SPACE, 0, "ann"), user_in(SPACE, 3, "cara")
    await rc.hset(SPACE.room(cara), mapping={"live": "1", "started": 0})
    await fund(rc, sender, 100)
    await wallet.send_gift(
        sender=sender,
        adult=True,
        creator=cara,
        room=cara,
        gift=ROSE,
        count=2,
        key="gift-key-old-session",
        in_room=room_of(cara, sender),
    )
    await rc.hset(SPACE.room(cara), "live", "0")  # ended, then live again before the credit
    opened = register(rc, "room_open")
    room_keys = [SPACE.room(cara), SPACE.live_rooms_of(cara), SPACE.board_session(cara)]
    await opened(keys=room_keys, args=[cara, "Again", 0, ""])
    await credited_all(Crediting(rc, SPACE), creators=[cara])
    assert await wallet.boards.top(Board.SESSION, cara) == []
    assert table(await wallet.boards.top(Board.WEEK, cara)) == [(1, sender, sender.title(), 10)]
