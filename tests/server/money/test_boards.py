"""The leaderboards on one Redis, counted by send_gift.lua with the money: exact ranks and
coins after gifts from several senders, ties by user id, a replayed key counted once, names
as text, a money-only gift on no session board, a new session emptying its board, the week
and the day rolling over by money time (the Wallet's test clock), and the reads' refusals."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.server.money import keys
from giftstream.server.money.boards import Board, Entry, board_of
from giftstream.server.money.catalog import Gift
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import GiftRoom, Wallet
from giftstream.server.scripts import register
from tests.server.conftest import NOW_MS, Fund, MoneyClock

ROSE = Gift(id="rose", name="Rose", coins=1, animation="petals")
HEART = Gift(id="heart", name="Heart", coins=5, animation="heart")
DAY_MS = 86_400_000
NAMES = {"ann": "Ann", "bob": "Bob <b>", "cat": 'Cat "C"', "dan": "Dan"}


def in_room(room: str, sender: str) -> GiftRoom:
    """The gateway's gift in `room` (memory broker: no log)."""
    return GiftRoom(
        record=keys.SINGLE.room(room),
        log="",
        room_json=orjson.dumps(room),
        sender_json=orjson.dumps({"id": sender, "name": NAMES[sender]}),
        gift_json=b"{}",
        log_size=0,
        name_json=orjson.dumps(NAMES[sender]),
    )


async def go_live(redis: aioredis.Redis, room: str, name: str | None = None) -> None:
    """room_open.lua, as the hub calls it: a new session."""
    opened = register(redis, "room_open")
    name_json = orjson.dumps(name) if name else b""
    await opened(
        keys=[
            keys.SINGLE.room(room),
            keys.SINGLE.live_rooms_of(room),
            keys.SINGLE.board_session(room),
        ],
        args=[room, "Show", NOW_MS, name_json],
    )


async def send(
    wallet: Wallet, sender: str, room: str, key: str, gift: Gift = ROSE, count: int = 1
) -> bool:
    settled = await wallet.send_gift(
        sender=sender,
        adult=True,
        creator=room,
        room=room,
        gift=gift,
        count=count,
        key=key,
        in_room=in_room(room, sender),
    )
    return settled.replayed


def table(entries: list[Entry]) -> list[tuple[int, str, str, int]]:
    return [(e.rank, e.user, e.name, e.coins) for e in entries]


@pytest.fixture
async def senders(fund_coins: Fund) -> None:
    for user in NAMES:
        await fund_coins(user, 10_000)


async def test_ranks_and_coins_from_several_senders(
    wallet: Wallet, redis_client: aioredis.Redis, senders: None
) -> None:
    await go_live(redis_client, "cara", "Cara")
    await send(wallet, "ann", "cara", "gift-key-a1", HEART, 3)  # 15
    await send(wallet, "bob", "cara", "gift-key-b1", HEART, 2)  # 10
    await send(wallet, "cat", "cara", "gift-key-c1", ROSE, 10)  # 10: tied with bob
    await send(wallet, "dan", "cara", "gift-key-d1", ROSE, 1)  # 1
    await send(wallet, "bob", "cara", "gift-key-b2", ROSE, 2)  # bob 12
    expected = [
        (1, "ann", "Ann", 15),
        (2, "bob", "Bob <b>", 12),
        (3, "cat", 'Cat "C"', 10),
        (4, "dan", "Dan", 1),
    ]
    boards = wallet.boards
    assert table(await boards.top(Board.SESSION, "cara")) == expected
    assert table(await boards.top(Board.WEEK, "cara")) == expected
    assert table(await boards.top(Board.CREATORS_DAY, None)) == [(1, "cara", "Cara", 38)]
    assert table(await boards.leaders("cara")) == expected[:3]


async def test_ties_rank_by_user_id_and_at_most_ten(
    wallet: Wallet, redis_client: aioredis.Redis, fund_coins: Fund
) -> None:
    """Twelve senders of one rose each: the first ten ids in byte order ('B' < 'a')."""
    await go_live(redis_client, "cara")
    users = [f"u{i:02d}" for i in range(11, -1, -1)] + ["Zed"]
    for user in users:
        NAMES.setdefault(user, user.upper())
        await fund_coins(user, 10)
        await send(wallet, user, "cara", f"gift-key-{user}")
    await send(wallet, "u05", "cara", "gift-key-u05-more")
    top = await wallet.boards.top(Board.SESSION, "cara")
    first_ten = ["u05", "Zed", "u00", "u01", "u02", "u03", "u04", "u06", "u07", "u08"]
    assert [e.user for e in top] == first_ten
    assert [e.rank for e in top] == list(range(1, 11))
    assert [e.coins for e in top] == [2, *[1] * 9]
    assert [e.user for e in await wallet.boards.leaders("cara")] == ["u05", "Zed", "u00"]


async def test_a_replayed_key_counts_once(
    wallet: Wallet, redis_client: aioredis.Redis, senders: None
) -> None:
    await go_live(redis_client, "cara")
    assert not await send(wallet, "ann", "cara", "gift-key-once", HEART, 2)
    for _ in range(3):
        assert await send(wallet, "ann", "cara", "gift-key-once", HEART, 2)
    for board in (Board.SESSION, Board.WEEK):
        assert table(await wallet.boards.top(board, "cara")) == [(1, "ann", "Ann", 10)]
    assert table(await wallet.boards.top(Board.CREATORS_DAY, None)) == [(1, "cara", "cara", 10)]


async def test_a_money_only_gift_counts_on_the_week_not_the_session(
    wallet: Wallet, redis_client: aioredis.Redis, senders: None
) -> None:
    await go_live(redis_client, "cara")
    await wallet.send_gift(
        sender="ann", adult=True, creator="cara", room="cara", gift=ROSE, count=4, key="gift-key-m"
    )
    assert await wallet.boards.top(Board.SESSION, "cara") == []
    assert table(await wallet.boards.top(Board.WEEK, "cara")) == [(1, "ann", "ann", 4)]


async def test_going_live_again_starts_an_empty_session(
    wallet: Wallet, redis_client: aioredis.Redis, senders: None
) -> None:
    await go_live(redis_client, "cara")
    await send(wallet, "ann", "cara", "gift-key-s1", HEART)
    await go_live(redis_client, "cara")  # still live: the same session
    assert len(await wallet.boards.top(Board.SESSION, "cara")) == 1
    await redis_client.hset(keys.SINGLE.room("cara"), "live", "0")  # ended
    await go_live(redis_client, "cara")
    assert await wallet.boards.top(Board.SESSION, "cara") == []
    await send(wallet, "bob", "cara", "gift-key-s2")
    assert table(await wallet.boards.top(Board.SESSION, "cara")) == [(1, "bob", "Bob <b>", 1)]
    assert [e.user for e in await wallet.boards.top(Board.WEEK, "cara")] == ["ann", "bob"]


async def test_week_and_day_roll_over_by_money_time(
    wallet: Wallet, redis_client: aioredis.Redis, money_clock: MoneyClock, senders: None
) -> None:
    """NOW_MS is a Monday 16:00 UTC: a gift on Sunday is last week's; one after midnight is
    tomorrow's on the day board, this week's on the week board."""
    monday = keys.iso_week(keys.epoch_day(NOW_MS))
    assert monday == keys.epoch_day(NOW_MS)
    await go_live(redis_client, "cara")
    money_clock.now_ms = NOW_MS - DAY_MS  # Sunday
    await send(wallet, "ann", "cara", "gift-key-sun", HEART)
    assert [e.coins for e in await wallet.boards.top(Board.WEEK, "cara")] == [5]
    money_clock.now_ms = NOW_MS
    await send(wallet, "bob", "cara", "gift-key-mon")
    assert table(await wallet.boards.top(Board.WEEK, "cara")) == [(1, "bob", "Bob <b>", 1)]
    assert table(await wallet.boards.top(Board.CREATORS_DAY, None)) == [(1, "cara", "cara", 1)]
    money_clock.now_ms = NOW_MS + DAY_MS  # Tuesday
    assert await wallet.boards.top(Board.CREATORS_DAY, None) == []
    await send(wallet, "cat", "cara", "gift-key-tue", ROSE, 2)
    assert [e.user for e in await wallet.boards.top(Board.WEEK, "cara")] == ["cat", "bob"]
    assert table(await wallet.boards.top(Board.CREATORS_DAY, None)) == [(1, "cara", "cara", 2)]
    money_clock.now_ms = NOW_MS + 7 * DAY_MS  # next Monday
    assert await wallet.boards.top(Board.WEEK, "cara") == []
    session = await wallet.boards.top(Board.SESSION, "cara")
    assert [e.user for e in session] == ["ann", "cat", "bob"]  # the session is no period
    week_key = keys.SINGLE.board_week("cara", monday)
    day_key = keys.SINGLE.board_creators_day(0, monday + 1)
    assert 0 < await redis_client.pttl(week_key) <= 15 * DAY_MS  # kept ~15 days past Monday
    assert 0 < await redis_client.pttl(day_key) <= 3 * DAY_MS


async def test_reads_refuse_a_bad_board_or_room_and_an_unknown_room(wallet: Wallet) -> None:
    for board, room in [
        ("month", "cara"),
        (None, "cara"),
        ("session", None),
        ("week", "bad room"),
        ("creators_day", "cara"),
    ]:
        with pytest.raises(Refusal) as info:
            board_of(board, room)
        assert info.value.reason is Reason.BAD_REQUEST
    for kind in (Board.SESSION, Board.WEEK):
        with pytest.raises(Refusal) as info:
            await wallet.boards.top(kind, "nobody")
        assert info.value.reason is Reason.UNKNOWN_ROOM
    assert await wallet.boards.top(Board.CREATORS_DAY, None) == []
