"""Integer-only money, at every layer a count or an amount can enter: a float (1.0, 1.5),
1e309 (inf), NaN, a negative, 2**53 + 1 (no longer exact as a double), 2**63, a boolean or a
numeric string is refused, and nothing is written (the whole keyspace, consumer groups
included, is compared before and after).

  a. the Wallet API (server/money/wallet.py), for each value it takes;
  b. the Lua scripts called raw with EVALSHA, as a caller bypassing wallet.py would: each
     numeric ARGV position of each script given each bad text, and the prelude's integer
     parsers on their own with a range wide enough that only exactness can refuse;
  c. over the wire: a real server's WebSocket `gift` and the signed admin HTTP API.

Cases already covered elsewhere are cited where they are left out, not repeated.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.app import App
from giftstream.server.ledger.checkpoint import CheckpointKeys
from giftstream.server.money import keys
from giftstream.server.money.admin import http_status
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import MAX_BALANCE, Wallet
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.model.conftest import Eval, Everything, fund
from tests.model.keyspace import snapshot
from tests.server.conftest import NOW_MS

HEART = Gift(id="heart", name="Heart", coins=5, animation="heart.webp")
PACK_70 = Package(id="coins_70", coins=70, price_cents=99, currency="USD")

# Python values a buggy or hostile caller could hand the Wallet API.
BAD_VALUES: dict[str, Any] = {
    "float-1.0": 1.0,
    "float-1.5": 1.5,
    "inf-1e309": 1e309,
    "nan": math.nan,
    "negative": -1,
    "2^53+1": 2**53 + 1,
    "2^63": 2**63,
    "true": True,
    "false": False,
    "str-5": "5",
}


def bad(*leave_out: str) -> list[Any]:
    """BAD_VALUES as pytest params with readable ids, without those covered elsewhere."""
    return [pytest.param(v, id=k) for k, v in BAD_VALUES.items() if k not in leave_out]


E = TypeVar("E", bound=Exception)


async def refused_unchanged(
    state: Everything, call: Callable[[], Awaitable[Any]], error: type[E]
) -> E:
    before = await state()
    with pytest.raises(error) as info:
        await call()
    assert await state() == before
    return info.value


# ---- a. the Wallet API ----------------------------------------------------------------------


async def gift(money: Wallet, *, count: Any = 1, gift: Gift = HEART) -> Any:
    return await money.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        gift=gift,
        count=count,
        key="gift-key-int",
    )


# tests/server/money/test_wallet.py::test_bad_count_is_refused_before_redis has -1 and True
@pytest.mark.parametrize("count", bad("negative", "true"))
async def test_gift_count(money: Wallet, state: Everything, count: Any) -> None:
    await fund(money, "ann", 1000)
    error = await refused_unchanged(state, lambda: gift(money, count=count), Refusal)
    assert error.reason is Reason.BAD_COUNT


@pytest.mark.parametrize("coins", bad())
async def test_gift_coins_in_the_catalog_gift(money: Wallet, state: Everything, coins: Any) -> None:
    await fund(money, "ann", 1000)
    priced = Gift(id="odd", name="Odd", coins=coins, animation="odd.webp")
    await refused_unchanged(state, lambda: gift(money, gift=priced), ValueError)


@pytest.mark.parametrize("now_ms", bad())
async def test_a_test_clocks_time(
    money: Wallet, redis_client: aioredis.Redis, state: Everything, now_ms: Any
) -> None:
    """A test clock (the only way a time reaches a script) that gives a non-integer."""
    await fund(money, "ann", 1000)
    clocked = Wallet(redis_client, Economics(), clock=lambda: now_ms)
    await refused_unchanged(state, lambda: gift(clocked, count=1), ValueError)


@pytest.mark.parametrize("field", ["coins", "price_cents"])
@pytest.mark.parametrize("value", bad())
async def test_purchase_package(money: Wallet, state: Everything, field: str, value: Any) -> None:
    package = Package(**{**PACK_70.as_wire(), field: value})
    await refused_unchanged(
        state,
        lambda: money.purchase(receipt="rc-int-1", user="ann", package=package, adult=True),
        ValueError,
    )


# test_wallet.py::test_payout_refusals_with_a_used_key has 0 and 10**12 + 1
@pytest.mark.parametrize("diamonds", bad())
async def test_payout_diamonds(money: Wallet, state: Everything, diamonds: Any) -> None:
    await fund(money, "ann", 30_000)
    await money.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        count=3,
        key="gift-key-castle",
        gift=Gift("castle", "Castle", 10_000, "castle.webp"),
    )
    error = await refused_unchanged(
        state,
        lambda: money.payout(creator="cara", diamonds=diamonds, key="payout-key-1"),
        Refusal,
    )
    assert (http_status(error), error.code) == (422, "bad_request")


# test_wallet.py::test_bad_daily_limit has -1, True, 1.5 and "5"
@pytest.mark.parametrize("limit", bad("negative", "true", "float-1.5", "str-5"))
async def test_daily_limit(money: Wallet, state: Everything, limit: Any) -> None:
    await money.set_daily_limit("ann", 50)
    error = await refused_unchanged(state, lambda: money.set_daily_limit("ann", limit), Refusal)
    assert (http_status(error), error.code) == (422, "bad_request")


async def test_a_float_from_the_economics_fails_its_own_movement_only(
    redis_client: aioredis.Redis,
) -> None:
    """Rates are the catalog's to validate; if a float got through, the payout it spoils is
    refused before it is sent, and a gift sent in the same loop turn (the same pipelined
    write) still settles. Before the batcher packed at submit, both hung for good."""
    money = Wallet(redis_client, Economics(cents_per_100_diamonds=0.5, payout_min_diamonds=1))  # type: ignore[arg-type]
    await money.load_scripts()
    await fund(money, "ann", 100)
    await gift(money, count=2)  # cara: 5 diamonds
    before = await snapshot(redis_client)
    payout = money.payout(creator="cara", diamonds=5, key="payout-key-1")
    settled = money.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        gift=HEART,
        count=1,
        key="gift-key-same-turn",
    )
    paid, sent = await asyncio.wait_for(asyncio.gather(payout, settled, return_exceptions=True), 5)
    assert isinstance(paid, TypeError)
    assert not isinstance(sent, BaseException)
    assert sent.coins == 85
    after = await snapshot(redis_client)
    assert keys.SINGLE.payout("payout-key-1") not in after
    assert (
        after[keys.SINGLE.wallet("cara")][1]["diamonds"] == "7"
    )  # 5 + the new gift's 2, none paid
    assert len(after[keys.LEDGER][1][0]) == len(before[keys.LEDGER][1][0]) + 1
    await asyncio.wait_for(money.drain(), 5)


# ---- b. the Lua scripts, called raw ---------------------------------------------------------

# Text a caller could put in a numeric ARGV: floats, inf, NaN, negatives, integers past 2^53
# and 2^63, booleans, hex, padding, empty; then forms Lua's tonumber() takes but that are not
# Redis's integer form ("-0" even passed as 0 and failed HINCRBY midway through the writes).
BAD_ARGV = [
    "1.5",
    "1e309",
    "inf",
    "-inf",
    "nan",
    "-1",
    "9007199254740993",
    "9223372036854775808",
    "true",
    "0x10",
    " 5",
    "5 ",
    "",
    "-0",
    "5.0",
    "1e2",
    "+5",
    "05",
    "1,5",
]

DAY = keys.utc_day(NOW_MS)
GIFT_KEY = "gift-key-raw"
RECEIPT = "fund-ann-100"  # made by fund(money, "ann", 100)
FAR_FUTURE_MS = 4_000_000_000_000  # a PEXPIREAT in the past would delete what it wrote


class RawCall(NamedTuple):
    """A script's KEYS and a good ARGV, built the way its caller builds them (wallet.py,
    earnings.py, checkpoint.py, consumers.py), and the names of its numeric positions."""

    keys: list[str]
    args: list[Any]
    numeric: dict[int, str]  # 1-based ARGV position -> what it is


RAW_CALLS: dict[str, RawCall] = {
    "send_gift": RawCall(
        [
            keys.SINGLE.wallet("ann"),
            keys.SINGLE.wallet("cara"),
            keys.SINGLE.gift_key("ann", GIFT_KEY),
            keys.SINGLE.combo("ann", "cara"),
            keys.LEDGER,
            keys.SINGLE.held("cara"),
            keys.SINGLE.room("cara"),  # live (setup_raw); the gateway's call under the Redis broker
            keys.SINGLE.room_log("cara"),
            "",  # no credit outbox: one Redis
            keys.SINGLE.board_session("cara"),
            keys.SINGLE.board_week_prefix("cara"),
            keys.SINGLE.board_names("cara"),
            keys.SINGLE.board_creators_day_prefix(0),
            keys.SINGLE.board_creator_names(0),
        ],
        [
            "ev-1",
            "ann",
            "cara",
            "cara",
            "heart",
            GIFT_KEY,
            1,
            5,
            2,
            1,
            "",  # now: Redis's TIME
            keys.GIFT_KEY_TTL_MS,
            keys.COMBO_GAP_MS,
            keys.COMBO_TTL_MS,
            7,
            '"cara"',
            '{"id":"ann","name":"Ann"}',
            '{"id":"heart","name":"Heart","coins":5,"animation":"heart.webp"}',
            1024,
            '"Ann"',  # the sender's name for the boards
            1,  # sent in the room: counts on its session board
        ],
        {
            7: "count",
            8: "coins",
            9: "diamonds",
            10: "adult",
            12: "key_ttl",
            13: "combo_gap",
            14: "combo_ttl",
            15: "hold_days",
            19: "log_size",
            21: "in_room",
        },
    ),
    "purchase": RawCall(
        [keys.SINGLE.wallet("ann"), keys.SINGLE.receipt("rc-raw-1"), keys.LEDGER],
        ["ev-1", "ann", "rc-raw-1", "coins_70", "USD", 70, 99, 1, "", MAX_BALANCE],
        {6: "coins", 7: "price_cents", 8: "adult", 10: "max_balance"},
    ),
    "refund": RawCall(
        [keys.SINGLE.receipt(RECEIPT), keys.SINGLE.wallet("ann"), keys.LEDGER],
        ["ev-1", "ann", RECEIPT, ""],
        {},
    ),
    "payout": RawCall(
        [
            keys.SINGLE.wallet("cara"),
            keys.SINGLE.payout("payout-key-1"),
            keys.LEDGER,
            keys.SINGLE.held("cara"),
        ],
        ["ev-1", "po-1", "cara", "payout-key-1", 20, 10, "", 2_000_000],
        {5: "diamonds", 6: "cents", 8: "daily_cap"},
    ),
    "earnings": RawCall(
        [keys.SINGLE.earnings_seen("cara", DAY), keys.SINGLE.earnings("cara")],
        ["ev-1", DAY, 2, 5, 1, FAR_FUTURE_MS],
        {3: "diamonds", 4: "coins", 5: "count", 6: "keep_until"},
    ),
    "checkpoint": RawCall(
        CheckpointKeys.of().all(),
        ["", "1-1", 1, 0, 0, 0, 0, 0, "entries", 1],
        {
            3: "main_pairs",
            4: "wallet_pairs",
            5: "receipt_pairs",
            6: "payout_keys",
            7: "negatives",
            8: "breaches",
        },
    ),
    "dead_letter": RawCall(
        [keys.LEDGER, keys.LEDGER + ":dead"],
        ["earnings", "0-1", "{}", "failed", 3, "consumer-1"],  # stream id set by the setup
        {5: "deliveries"},
    ),
}


async def setup_raw(name: str, money: Wallet, redis: aioredis.Redis) -> RawCall:
    """State in which the script's good call succeeds: ann has 100 coins from RECEIPT, cara
    100 diamonds; for dead_letter, a ledger entry pending in a group."""
    raw = RAW_CALLS[name]
    await fund(money, "ann", 100)
    await fund(money, "bob", 400)
    await money.send_gift(
        sender="bob",
        adult=True,
        creator="cara",
        room="cara",
        count=40,
        key="gift-key-bob",
        gift=HEART,
    )
    await redis.hset(keys.SINGLE.room("cara"), "live", "1")
    if name == "dead_letter":
        await redis.xgroup_create(keys.LEDGER, "earnings", id="0")
        reply: Any = await redis.xreadgroup("earnings", "consumer-1", {keys.LEDGER: ">"}, count=1)
        (_, [(stream_id, _), *_]), *_ = reply
        args = [*raw.args]
        args[1] = stream_id.decode()
        return raw._replace(args=args)
    return raw


@pytest.mark.parametrize(
    ("name", "position"),
    [
        pytest.param(name, position, id=f"{name}-ARGV{position}-{what}")
        for name, raw in RAW_CALLS.items()
        for position, what in raw.numeric.items()
    ],
)
async def test_raw_script_refuses_a_bad_number(
    money: Wallet,
    redis_client: aioredis.Redis,
    state: Everything,
    evalsha: Eval,
    name: str,
    position: int,
) -> None:
    """Each bad text in this ARGV position: a Redis error naming the position, no write.
    Then the good call succeeds, so the refusals were the bad value's doing."""
    raw = await setup_raw(name, money, redis_client)
    taken: list[str] = []
    for text in BAD_ARGV:
        args = [*raw.args]
        args[position - 1] = text
        before = await state()
        try:
            outcome = repr(await evalsha(name, raw.keys, args))
        except ResponseError as error:
            outcome = "" if f"ARGV[{position}]" in str(error) else f"other error: {error}"
        if await state() != before:
            outcome += " and wrote to Redis"
            await redis_client.flushall()
            raw = await setup_raw(name, money, redis_client)
        if outcome:
            taken.append(f"{text!r}: {outcome}")
    assert not taken, f"{name} ARGV[{position}] was not refused cleanly:\n" + "\n".join(taken)
    before = await state()
    reply = await evalsha(name, raw.keys, raw.args)
    assert not isinstance(reply, list) or reply[0] == b"ok", reply
    assert await state() != before


async def test_raw_calls_mirror_what_wallet_py_sends(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAW_CALLS stays true to wallet.py: as many KEYS and ARGV, integers exactly at the
    positions named numeric (a spy on the batcher, the real calls still run)."""
    money = Wallet(redis_client, Economics(payout_min_diamonds=1), payout_hold_days=0)
    await money.load_scripts()
    names = {id(script): name for name, script in money._scripts.items()}
    sent: dict[str, tuple[list[str], list[Any]]] = {}
    assert money._batcher is not None  # one Redis: the batcher carries every call
    submit = money._batcher.submit

    def spy(script: Any, script_keys: Any, args: Any, on_reply: Any) -> Any:
        sent[names[id(script)]] = (list(script_keys), list(args))
        return submit(script, script_keys, args, on_reply)

    monkeypatch.setattr(money._batcher, "submit", spy)
    await fund(money, "ann", 100)
    await gift(money)
    await money.payout(creator="cara", diamonds=2, key="payout-key-1")
    await money.refund(receipt=RECEIPT)
    assert sorted(sent) == ["payout", "purchase", "refund", "send_gift"]
    for name, (script_keys, args) in sent.items():
        raw = RAW_CALLS[name]
        assert (len(script_keys), len(args)) == (len(raw.keys), len(raw.args)), name
        assert {i + 1 for i, v in enumerate(args) if type(v) is int} == set(raw.numeric), name
        assert all(type(v) is str for i, v in enumerate(args) if i + 1 not in raw.numeric)
        assert args[NOW_AT[name] - 1] == "", name  # production sends no time: Redis's TIME


# Where each money script takes its time: '' (Redis's TIME, what production sends) or the
# ms of a test clock.
NOW_AT = {"send_gift": 11, "purchase": 9, "refund": 4, "payout": 7}


@pytest.mark.parametrize(
    "name", [pytest.param(name, id=f"{name}-ARGV{at}-now") for name, at in NOW_AT.items()]
)
async def test_raw_script_refuses_a_bad_time(
    money: Wallet,
    redis_client: aioredis.Redis,
    state: Everything,
    evalsha: Eval,
    name: str,
) -> None:
    """The time position takes '' or an integer in Redis's form; anything else is refused
    with no write. Then a test clock's integer time is taken."""
    raw = await setup_raw(name, money, redis_client)
    position = NOW_AT[name]
    taken: list[str] = []
    for text in BAD_ARGV:
        if text == "":
            continue  # production's value: TIME
        args = [*raw.args]
        args[position - 1] = text
        before = await state()
        try:
            outcome = repr(await evalsha(name, raw.keys, args))
        except ResponseError as error:
            outcome = "" if f"ARGV[{position}]" in str(error) else f"other error: {error}"
        if await state() != before:
            outcome += " and wrote to Redis"
        if outcome:
            taken.append(f"{text!r}: {outcome}")
    assert not taken, f"{name} ARGV[{position}] was not refused cleanly:\n" + "\n".join(taken)
    args = [*raw.args]
    args[position - 1] = NOW_MS
    before = await state()
    reply = await evalsha(name, raw.keys, args)
    assert not isinstance(reply, list) or reply[0] == b"ok", reply
    assert await state() != before


def with_prelude(body: str) -> str:
    """A script of the shared helpers and `body`, as wallet.py assembles its scripts."""
    prelude = (
        resources.files("giftstream.server").joinpath("lua", "_prelude.lua").read_text("utf-8")
    )
    return "#!lua\n" + prelude + "\n" + body


PRELUDE_CASES = [
    *[
        pytest.param(text, int(text), id=f"ok:{text}")
        for text in ("0", "7", "-1", "99", "1000000000000", "9007199254740991", "-9007199254740991")
    ],
    *[
        pytest.param(text, None, id=f"refused:{text!r}")
        for text in (
            *(t for t in BAD_ARGV if t != "-1"),
            "9007199254740992",
            "-9007199254740993",
            "18446744073709551616",
            "1e15",
            "٣",
            "0b1",
            "1_000",
            "5\n",
            "\t5",
            "- 5",
            "--5",
            "00",
        )
    ],
]


@pytest.mark.parametrize(("text", "expected"), PRELUDE_CASES)
async def test_prelude_int_arg_is_exact(
    redis_client: aioredis.Redis, text: str, expected: int | None
) -> None:
    """With a range of +-2^60, only the parser itself can refuse: an integer past 2^53 must
    be refused, not rounded to its neighbour, and only Redis's own integer form passes."""
    lua = with_prelude("return int_arg(1, -2^60, 2^60)")
    if expected is None:
        with pytest.raises(ResponseError, match=r"ARGV\[1\]"):
            await redis_client.eval(lua, 0, text)
    else:
        assert await redis_client.eval(lua, 0, text) == expected


@pytest.mark.parametrize(("text", "expected"), PRELUDE_CASES)
async def test_prelude_stored_int_is_exact(
    redis_client: aioredis.Redis, text: str, expected: int | None
) -> None:
    """The same parser reads stored balances (tests/server/money/test_wallet.py has corrupt values
    stopping a whole gift)."""
    lua = with_prelude("return stored_int(KEYS[1], ARGV[1])")
    await redis_client.hset("h", "f", text)
    if expected is None:
        with pytest.raises(ResponseError, match="not an exact integer"):
            await redis_client.eval(lua, 1, "h", "f")
    else:
        assert await redis_client.eval(lua, 1, "h", "f") == expected


# ---- c. over the wire -----------------------------------------------------------------------

MONEY_PREFIXES = (
    *(
        keys.PREFIX + kind
        for kind in ("wallet:", "gift_key:", "spent:", "combo:", "receipt:", "payout:")
    ),
    keys.LEDGER,
)


async def money_keys(redis: aioredis.Redis) -> dict[str, Any]:
    """Every money key of a running server (rooms, seqs and viewers keep moving)."""
    return {k: v for k, v in (await snapshot(redis)).items() if k.startswith(MONEY_PREFIXES)}


# JSON text of `count` in a `gift` frame, and the code PROTOCOL.md §2 gives it: a JSON
# value that is no integer from 1 to 99 is bad_count; text orjson refuses (NaN, Infinity, a
# number past a double) makes the frame no JSON at all: bad_request. tests/server/
# test_gifts.py::test_gift_refusals sends 0, 100, 1.0, "1" and true over the wire, and
# tests/protocol/test_messages.py decodes these and more without a server.
WIRE_COUNTS = {
    "1.5": "bad_count",
    "1e2": "bad_count",
    "-1": "bad_count",
    "false": "bad_count",
    '"5"': "bad_count",
    "null": "bad_count",
    "9007199254740993": "bad_count",  # 2^53 + 1
    "9223372036854775808": "bad_count",  # 2^63
    "18446744073709551616": "bad_count",  # 2^64: orjson makes it a float
    "1e309": "bad_request",
    "-1e309": "bad_request",
    "NaN": "bad_request",
    "Infinity": "bad_request",
    "-Infinity": "bad_request",
}


@pytest.fixture
async def live_room(app: App, tokens: TokenMaker, admin: AdminClient) -> Any:
    """Cara is live; ann (700 coins) has joined her room."""
    await admin.buy("ann", "coins_700")
    cara, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await cara.request({"type": "go_live", "title": "Show"})
    ann, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await ann.request({"type": "join", "room": "cara"})
    yield ann
    for client in (ann, cara):
        await client.close()


@pytest.mark.parametrize(("literal", "code"), WIRE_COUNTS.items(), ids=list(WIRE_COUNTS))
async def test_websocket_gift_count(
    live_room: WsClient, redis_client: aioredis.Redis, literal: str, code: str
) -> None:
    ann = live_room
    before = await money_keys(redis_client)
    await ann.send(
        f'{{"type":"gift","room":"cara","gift":"rose","count":{literal},"key":"gift-key-wire"}}'
    )
    error = await ann.expect("error")
    assert error["code"] == code, error
    assert await ann.request({"type": "balance"}) == {
        "type": "balance",
        "coins": 700,
        "diamonds": 0,
    }
    assert await money_keys(redis_client) == before
    ok = await ann.request(
        {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": "gift-key-wire"}
    )
    assert ok["type"] == "gift_ok"  # the refused key was never recorded


def body(template: str, literal: str) -> bytes:
    return template.replace("$", literal).encode()


# Raw JSON bodies, so values no encoder writes can be sent. tests/server/money/test_admin.py
# ::test_bad_daily_limit_is_400 and ::test_bad_input_is_400_and_changes_nothing send the rest
# of the list (1.5, 1e3, "100", true, false, 2^53 + 1, 2^64, 1e309, NaN, Infinity, ...).
ADMIN_BODIES = [
    *[
        ("PUT", "/v1/wallets/ann/limit", body('{"daily_limit": $}', v))
        for v in ("1.0", "-0.0", "Infinity", "-Infinity", "-1e309", "9223372036854775808")
    ],
    *[
        (
            "POST",
            "/v1/payouts",
            body('{"creator": "cara", "diamonds": $, "key": "payout-key-1"}', v),
        )
        for v in ("10000.5", "-1", "-Infinity", "9223372036854775808")
    ],
    *[
        ("POST", "/v1/purchases", body(t, v))
        for t, v in (
            (
                '{"receipt": "receipt-int-1", "user": "ann", "package": "coins_70", "adult": $}',
                "1.0",
            ),
            ('{"receipt": "receipt-int-1", "user": "ann", "package": "coins_70", "adult": $}', "0"),
            (
                '{"receipt": "receipt-int-1", "user": "ann", "package": "coins_70", "adult": $}',
                "NaN",
            ),
            ('{"receipt": "receipt-int-1", "user": "ann", "package": $}', "70.0"),
            ('{"receipt": "receipt-int-1", "user": "ann", "package": $}', "1e309"),
            ('{"receipt": $, "user": "ann", "package": "coins_70"}', "1.5"),
        )
    ],
]


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    ADMIN_BODIES,
    ids=[f"{path.rsplit('/', 1)[-1]}:{raw.decode()}" for _, path, raw in ADMIN_BODIES],
)
async def test_admin_api_amounts(
    app: App,
    admin: AdminClient,
    redis_client: aioredis.Redis,
    method: str,
    path: str,
    raw: bytes,
) -> None:
    """Signed correctly, so only the value can be what is refused."""
    await admin.buy("ann", "coins_700")
    before = await snapshot(redis_client)
    status, reply = await admin.call(method, path, raw)
    assert (status, reply["error"]) == (400, "bad_request"), reply
    assert await snapshot(redis_client) == before
