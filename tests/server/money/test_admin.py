"""The internal HTTP API over a real socket, on a real Wallet and a real Redis: every route's
exact reply, idempotency, every refusal (status, code, and nothing changed in Redis), signing,
input validation, health with Redis up and down, and the request counters."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.protocol.signing import SIGNATURE_HEADER, sign_request
from giftstream.server.embedded_redis import EmbeddedRedis
from giftstream.server.ledger.entries import read_entries
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.admin import AdminServer, build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import Wallet
from tests.server.conftest import NOW_MS, MoneyClock, Snapshot

SECRET = "admin-test-secret-0123456789abcdef"
DAY_MS = 86_400_000
SIGN = "sign"  # Api.call's default: sign the request correctly


Clock = MoneyClock  # the API's clock, moved by hand; the money fixture's Wallet takes it too


def sign_at(
    clock: Clock, method: str, path: str, body: bytes, secret: str = SECRET, skew_s: int = 0
) -> str:
    """The header a caller whose clock reads the API's clock (plus `skew_s`) sends."""
    return sign_request(secret, method, path, body, clock.now_ms // 1000 + skew_s)


class Api:
    """Raw HTTP to the admin server: signs as the payments backend does, or as told not to."""

    def __init__(
        self, http: aiohttp.ClientSession, base_url: str, clock: Clock, secret: str = SECRET
    ) -> None:
        self.http = http
        self.base_url = base_url
        self.clock = clock
        self.secret = secret
        self.headers: Any = None  # the last reply's headers

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        *,
        signature: str | None = SIGN,
    ) -> tuple[int, Any]:
        data = orjson.dumps(body) if isinstance(body, dict) else (body or b"")
        headers = {"Content-Type": "application/json"}
        if signature == SIGN:
            signature = sign_at(self.clock, method, path, data, self.secret)
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        async with self.http.request(
            method, self.base_url + path, data=data, headers=headers
        ) as response:
            self.headers = response.headers
            raw = await response.read()
            if response.content_type == "application/json" and raw:  # HEAD has no body
                return response.status, orjson.loads(raw)
            return response.status, raw.decode()

    async def buy(self, user: str, package: str, receipt: str) -> Any:
        status, body = await self.call(
            "POST", "/v1/purchases", {"receipt": receipt, "user": user, "package": package}
        )
        assert status == 200, body
        return body


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def money(
    redis_client: aioredis.Redis, catalog: Catalog, metrics: Metrics, clock: Clock
) -> AsyncIterator[Wallet]:
    """On the API's clock, which also stands in for Redis's TIME; no payout hold (the hold's
    own tests are tests/security/test_payout_hold.py)."""
    wallet = Wallet(
        redis_client, catalog.economics, metrics=metrics, clock=clock, payout_hold_days=0
    )
    await wallet.load_scripts()
    yield wallet
    await wallet.drain()


@pytest.fixture
async def api(
    money: Wallet,
    catalog: Catalog,
    redis_client: aioredis.Redis,
    metrics: Metrics,
    clock: Clock,
) -> AsyncIterator[Api]:
    app = build_admin_app(
        wallet=money,
        catalog=catalog,
        redis=redis_client,
        webhook_secret=SECRET,
        metrics=metrics,
        clock=clock,
    )
    async with AdminServer(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
        yield Api(http, server.url, clock)


async def gift(
    money: Wallet,
    key: str,
    *,
    gift_id: str = "hat",
    count: int = 1,
    sender: str = "ann",
    creator: str = "cara",
    catalog: Catalog,
) -> None:
    """A gift through the real money path, as a WebSocket session would send it."""
    await money.send_gift(
        sender=sender,
        adult=True,
        creator=creator,
        room=creator,
        gift=catalog.gifts[gift_id],
        count=count,
        key=key,
    )


async def ledger_kinds(redis: aioredis.Redis) -> list[str]:
    return [entry.data["kind"] async for entry in read_entries(redis)]


def wallet_view(user: str, **fields: Any) -> dict[str, Any]:
    view = {
        "user": user,
        "coins": 0,
        "diamonds": 0,
        "spent_today": 0,
        "daily_limit": None,
        "debt": 0,
        "spent_week": 0,
        "weekly_limit": None,
        "diamonds_held": 0,
        "diamonds_payable": 0,
        "payout_left_today": 2_000_000,
    }
    if "diamonds" in fields and "diamonds_payable" not in fields:
        view["diamonds_payable"] = fields["diamonds"]  # no hold in these tests
    if "spent_today" in fields and "spent_week" not in fields:
        view["spent_week"] = fields["spent_today"]  # these tests spend within one week
    return {**view, **fields}


# ---- AdminServer -------------------------------------------------------------------------


async def test_server_binds_a_free_port_and_stops(
    money: Wallet, catalog: Catalog, redis_client: aioredis.Redis, metrics: Metrics
) -> None:
    app = build_admin_app(
        wallet=money, catalog=catalog, redis=redis_client, webhook_secret=SECRET, metrics=metrics
    )
    async with aiohttp.ClientSession() as http:
        async with AdminServer(app, "127.0.0.1", 0) as server:
            assert server.port != 0
            async with http.get(server.url + "/healthz") as response:
                assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(server.url + "/healthz"):
                pass


# ---- purchases ---------------------------------------------------------------------------


async def test_purchase_credits_once_per_receipt(api: Api, redis_client: aioredis.Redis) -> None:
    body = {"receipt": "receipt-0001", "user": "ann", "package": "coins_700"}
    assert await api.call("POST", "/v1/purchases", body) == (200, {"coins": 700, "credited": True})
    assert api.headers["Content-Type"].startswith("application/json")
    assert await api.call("POST", "/v1/purchases", body) == (
        200,
        {"coins": 700, "credited": False},
    )
    assert await api.call("GET", "/v1/wallets/ann") == (200, wallet_view("ann", coins=700))
    assert await ledger_kinds(redis_client) == ["purchase"]


async def test_purchase_with_adult_true_is_credited(api: Api) -> None:
    body = {"receipt": "receipt-0001", "user": "ann", "package": "coins_70", "adult": True}
    assert await api.call("POST", "/v1/purchases", body) == (200, {"coins": 70, "credited": True})


async def test_receipt_of_another_user_is_refused(api: Api, redis_snapshot: Snapshot) -> None:
    await api.buy("ann", "coins_700", "receipt-0001")
    before = await redis_snapshot()
    status, body = await api.call(
        "POST", "/v1/purchases", {"receipt": "receipt-0001", "user": "bob", "package": "coins_700"}
    )
    assert (status, body["error"]) == (409, "receipt_reused")
    assert isinstance(body["message"], str) and body["message"]
    status, body = await api.call(
        "POST", "/v1/purchases", {"receipt": "receipt-0001", "user": "ann", "package": "coins_70"}
    )
    assert (status, body["error"]) == (409, "receipt_reused")
    assert await redis_snapshot() == before


async def test_underage_purchase_is_refused(api: Api, redis_snapshot: Snapshot) -> None:
    before = await redis_snapshot()
    status, body = await api.call(
        "POST",
        "/v1/purchases",
        {"receipt": "receipt-0001", "user": "kid", "package": "coins_70", "adult": False},
    )
    assert (status, body["error"]) == (403, "underage")
    assert await redis_snapshot() == before
    assert await api.call("GET", "/v1/wallets/kid") == (200, wallet_view("kid"))


async def test_unknown_package_is_422(api: Api, redis_snapshot: Snapshot) -> None:
    before = await redis_snapshot()
    status, body = await api.call(
        "POST", "/v1/purchases", {"receipt": "receipt-0001", "user": "ann", "package": "coins_1"}
    )
    assert (status, body["error"]) == (422, "unknown_package")
    assert await redis_snapshot() == before


# ---- refunds and debt --------------------------------------------------------------------


async def test_refund_once(api: Api, redis_snapshot: Snapshot) -> None:
    await api.buy("ann", "coins_700", "receipt-0001")
    first = {
        "receipt": "receipt-0001",
        "user": "ann",
        "refunded": True,
        "coins_taken": 700,
        "debt_added": 0,
        "coins": 0,
        "debt": 0,
    }
    assert await api.call("POST", "/v1/refunds", {"receipt": "receipt-0001"}) == (200, first)
    before = await redis_snapshot()
    assert await api.call("POST", "/v1/refunds", {"receipt": "receipt-0001"}) == (
        200,
        {**first, "refunded": False},
    )
    assert await redis_snapshot() == before
    assert await api.call("GET", "/v1/wallets/ann") == (200, wallet_view("ann"))


async def test_refund_of_unknown_receipt_is_404(api: Api, redis_snapshot: Snapshot) -> None:
    before = await redis_snapshot()
    status, body = await api.call("POST", "/v1/refunds", {"receipt": "receipt-none"})
    assert (status, body["error"]) == (404, "unknown_receipt")
    assert await redis_snapshot() == before


async def test_refund_after_spending_makes_debt(
    api: Api, money: Wallet, catalog: Catalog, redis_client: aioredis.Redis
) -> None:
    await api.buy("ann", "coins_700", "receipt-0001")
    await gift(money, "gift-key-0001", count=5, catalog=catalog)  # 5 hats: 495 coins
    status, body = await api.call("POST", "/v1/refunds", {"receipt": "receipt-0001"})
    assert status == 200
    taken = (body["coins_taken"], body["debt_added"], body["coins"], body["debt"])
    assert taken == (205, 495, 0, 495)  # all 205 left taken back, the other 495 owed
    assert await api.call("GET", "/v1/wallets/ann") == (
        200,
        wallet_view("ann", spent_today=495, debt=495),
    )
    with pytest.raises(Refusal) as refused:  # a user in debt cannot gift
        await gift(money, "gift-key-0002", gift_id="rose", catalog=catalog)
    assert refused.value.reason is Reason.DEBT
    # The next purchase pays the debt down first.
    assert await api.buy("ann", "coins_700", "receipt-0002") == {"coins": 205, "credited": True}
    assert await api.call("GET", "/v1/wallets/ann") == (
        200,
        wallet_view("ann", coins=205, spent_today=495),
    )
    assert await ledger_kinds(redis_client) == ["purchase", "gift", "refund", "purchase"]


# ---- wallets and daily limits ------------------------------------------------------------


async def test_wallet_of_unknown_user_is_empty(api: Api, redis_snapshot: Snapshot) -> None:
    assert await api.call("GET", "/v1/wallets/nobody.at:all-1") == (
        200,
        wallet_view("nobody.at:all-1"),
    )
    assert await redis_snapshot() == {}


async def test_wallet_shows_diamonds_and_the_utc_days_spend(
    api: Api, money: Wallet, catalog: Catalog, clock: Clock
) -> None:
    await api.buy("ann", "coins_700", "receipt-0001")
    await gift(money, "gift-key-0001", count=2, catalog=catalog)  # 198 coins, 99 diamonds
    assert await api.call("GET", "/v1/wallets/ann") == (
        200,
        wallet_view("ann", coins=502, spent_today=198),
    )
    assert await api.call("GET", "/v1/wallets/cara") == (200, wallet_view("cara", diamonds=99))
    day_start = NOW_MS - NOW_MS % DAY_MS
    clock.now_ms = day_start + DAY_MS - 1  # still that UTC day
    assert (await api.call("GET", "/v1/wallets/ann"))[1]["spent_today"] == 198
    clock.now_ms = day_start + DAY_MS  # the next UTC day starts from 0
    assert (await api.call("GET", "/v1/wallets/ann"))[1]["spent_today"] == 0


async def test_daily_limit_set_enforced_and_cleared(
    api: Api, money: Wallet, catalog: Catalog, redis_snapshot: Snapshot
) -> None:
    await api.buy("ann", "coins_700", "receipt-0001")
    assert await api.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": 100}) == (
        200,
        wallet_view("ann", coins=700, daily_limit=100),
    )
    assert await api.call("GET", "/v1/wallets/ann") == (
        200,
        wallet_view("ann", coins=700, daily_limit=100),
    )
    await gift(money, "gift-key-0001", catalog=catalog)  # 99 of 100
    before = await redis_snapshot()
    with pytest.raises(Refusal) as refused:
        await gift(money, "gift-key-0002", gift_id="heart", catalog=catalog)
    assert refused.value.reason is Reason.SPENDING_LIMIT
    assert await redis_snapshot() == before
    assert await api.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": None}) == (
        200,
        wallet_view("ann", coins=601, spent_today=99),
    )
    await gift(money, "gift-key-0002", gift_id="heart", catalog=catalog)
    assert await api.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": 0}) == (
        200,
        wallet_view("ann", coins=596, spent_today=104, daily_limit=0),
    )
    assert await api.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": 10**12}) == (
        200,
        wallet_view("ann", coins=596, spent_today=104, daily_limit=10**12),
    )


@pytest.mark.parametrize(
    "raw",
    [
        b'{"daily_limit": -1}',
        b'{"daily_limit": 1.5}',
        b'{"daily_limit": 100.0}',
        b'{"daily_limit": 1e3}',
        b'{"daily_limit": "100"}',
        b'{"daily_limit": true}',
        b'{"daily_limit": false}',
        b'{"daily_limit": [100]}',
        b'{"daily_limit": 1000000000001}',
        b'{"daily_limit": 9007199254740993}',
        b'{"daily_limit": 1e309}',
        b'{"daily_limit": NaN}',
        b'{"limit": 100}',
        b"{}",
        b"null",
        b"100",
        b"",
    ],
)
async def test_bad_daily_limit_is_400(api: Api, redis_snapshot: Snapshot, raw: bytes) -> None:
    assert await api.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": 50}) == (
        200,
        wallet_view("ann", daily_limit=50),
    )
    before = await redis_snapshot()
    status, body = await api.call("PUT", "/v1/wallets/ann/limit", raw)
    assert (status, body["error"]) == (400, "bad_request"), body
    assert await redis_snapshot() == before


BAD_PATH_USERS = ["u" * 65, "a%20b", "ann%2Fbob", "%C3%A9", "ann%00"]


@pytest.mark.parametrize("path", ["/v1/wallets/" + user for user in BAD_PATH_USERS])
async def test_bad_user_in_the_path_is_400(api: Api, path: str) -> None:
    status, body = await api.call("GET", path)
    assert (status, body["error"]) == (400, "bad_request")
    status, body = await api.call("PUT", path + "/limit", {"daily_limit": 1})
    assert (status, body["error"]) == (400, "bad_request")


# ---- payouts -----------------------------------------------------------------------------


@pytest.fixture
async def rich_creator(api: Api, money: Wallet, catalog: Catalog) -> str:
    """cara holds 10500 diamonds: three sports cars (21000 coins) at half share."""
    await api.buy("ann", "coins_17500", "receipt-0001")
    await api.buy("ann", "coins_3500", "receipt-0002")
    await gift(money, "gift-key-0001", gift_id="sports_car", count=3, catalog=catalog)
    assert (await api.call("GET", "/v1/wallets/cara"))[1]["diamonds"] == 10500
    return "cara"


async def test_payout_once_per_key(
    api: Api, rich_creator: str, redis_snapshot: Snapshot, redis_client: aioredis.Redis
) -> None:
    request = {"creator": rich_creator, "diamonds": 10000, "key": "payout-key-1"}
    status, first = await api.call("POST", "/v1/payouts", request)
    assert status == 200
    assert set(first) == {"payout", "cents", "diamonds"}
    assert (first["cents"], first["diamonds"]) == (5000, 500)
    assert isinstance(first["payout"], str) and first["payout"]
    before = await redis_snapshot()
    assert await api.call("POST", "/v1/payouts", request) == (200, first)
    assert await redis_snapshot() == before
    assert await api.call("GET", "/v1/wallets/cara") == (
        200,
        wallet_view("cara", diamonds=500, payout_left_today=2_000_000 - 10_000),
    )
    assert (await ledger_kinds(redis_client)).count("payout") == 1


async def test_payout_below_minimum_is_422(
    api: Api, rich_creator: str, redis_snapshot: Snapshot
) -> None:
    before = await redis_snapshot()
    status, body = await api.call(
        "POST", "/v1/payouts", {"creator": rich_creator, "diamonds": 9999, "key": "payout-key-1"}
    )
    assert (status, body["error"]) == (422, "below_minimum")
    assert await redis_snapshot() == before


async def test_payout_key_reused_for_other_diamonds_is_409(
    api: Api, rich_creator: str, redis_snapshot: Snapshot
) -> None:
    request = {"creator": rich_creator, "diamonds": 10000, "key": "payout-key-1"}
    assert (await api.call("POST", "/v1/payouts", request))[0] == 200
    before = await redis_snapshot()
    for changed in ({"diamonds": 10001}, {"creator": "dan"}):
        status, body = await api.call("POST", "/v1/payouts", {**request, **changed})
        assert (status, body["error"]) == (409, "key_reused")
    assert await redis_snapshot() == before


async def test_payout_of_more_than_held_is_409(
    api: Api, rich_creator: str, redis_snapshot: Snapshot
) -> None:
    before = await redis_snapshot()
    status, body = await api.call(
        "POST", "/v1/payouts", {"creator": rich_creator, "diamonds": 10501, "key": "payout-key-1"}
    )
    assert (status, body["error"]) == (409, "insufficient_diamonds")
    assert await redis_snapshot() == before


# ---- catalog -----------------------------------------------------------------------------


async def test_catalog(api: Api, catalog: Catalog) -> None:
    status, body = await api.call("GET", "/v1/catalog")
    assert (status, body) == (200, catalog.as_wire())
    rose = {"id": "rose", "name": "Rose", "coins": 1, "animation": "anim.rose.v1"}
    assert body["gifts"][0] == rose
    assert body["packages"][0] == {
        "id": "coins_70",
        "coins": 70,
        "price_cents": 99,
        "currency": "USD",
    }


# ---- signatures --------------------------------------------------------------------------

SIGNED_ROUTES = [
    ("POST", "/v1/purchases", {"receipt": "receipt-0009", "user": "ann", "package": "coins_70"}),
    ("POST", "/v1/refunds", {"receipt": "receipt-0001"}),
    ("GET", "/v1/wallets/ann", None),
    ("PUT", "/v1/wallets/ann/limit", {"daily_limit": 5}),
    ("POST", "/v1/payouts", {"creator": "cara", "diamonds": 10000, "key": "payout-key-1"}),
    ("GET", "/v1/catalog", None),
]


def bad_signatures(
    clock: Clock, method: str, path: str, body: dict[str, Any] | None
) -> dict[str, str | None]:
    data = orjson.dumps(body) if body else b""
    right = sign_at(clock, method, path, data)
    revision_1 = hmac.new(SECRET.encode(), path.encode() if method == "GET" else data, "sha256")
    other_method = "POST" if method != "POST" else "PUT"
    return {
        "missing": None,
        "empty": "",
        "garbage": "not-a-signature",
        "revision 1": revision_1.hexdigest(),
        "other secret": sign_at(clock, method, path, data, secret="another-secret-0123456789"),
        "other method": sign_at(clock, other_method, path, data),
        "other path": sign_at(clock, method, path + "x", data),
        "other body": sign_at(clock, method, path, data + b" "),
        "stale": sign_at(clock, method, path, data, skew_s=-301),
        "truncated": right[:-1],
        "non-ascii": right[:-1] + "é",
    }


@pytest.mark.parametrize(("method", "path", "body"), SIGNED_ROUTES)
async def test_bad_or_missing_signature_is_401_and_changes_nothing(
    api: Api,
    rich_creator: str,
    redis_snapshot: Snapshot,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    before = await redis_snapshot()
    for name, signature in bad_signatures(api.clock, method, path, body).items():
        status, reply = await api.call(method, path, body, signature=signature)
        assert (status, reply["error"]) == (401, "bad_signature"), name
        assert set(reply) == {"error", "message"}
    assert await redis_snapshot() == before
    assert (await api.call(method, path, body))[0] == 200  # the same request, signed


async def test_get_signs_the_path_and_query(api: Api) -> None:
    await api.buy("ann", "coins_70", "receipt-0001")
    bob = sign_at(api.clock, "GET", "/v1/wallets/bob", b"")
    assert (await api.call("GET", "/v1/wallets/ann", signature=bob))[0] == 401
    upper = sign_at(api.clock, "GET", "/v1/wallets/ann", b"").upper().replace("T=", "t=", 1)
    upper = upper.replace("V1=", "v1=", 1)  # the hex digits in upper case, the names as they are
    status, body = await api.call("GET", "/v1/wallets/ann", signature=upper)
    assert (status, body) == (200, wallet_view("ann", coins=70))
    # The query string is signed, as sent: no route reads one, but a later one may.
    no_query = sign_at(api.clock, "GET", "/v1/wallets/ann", b"")
    assert (await api.call("GET", "/v1/wallets/ann?x=1", signature=no_query))[0] == 401
    status, body = await api.call("GET", "/v1/wallets/ann?x=1")
    assert (status, body) == (200, wallet_view("ann", coins=70))


async def test_signature_is_over_the_raw_body(api: Api) -> None:
    """The exact bytes sent: whitespace and key order are part of what is signed."""
    raw = b'{ "package" : "coins_70",\n  "user": "ann", "receipt": "receipt-0001" }'
    assert await api.call("POST", "/v1/purchases", raw) == (200, {"coins": 70, "credited": True})
    reformatted = sign_at(api.clock, "POST", "/v1/purchases", orjson.dumps(orjson.loads(raw)))
    status, _ = await api.call("POST", "/v1/purchases", raw, signature=reformatted)
    assert status == 401


async def test_unsigned_routes(api: Api) -> None:
    status, body = await api.call("GET", "/healthz", signature=None)
    assert (status, body) == (200, {"ok": True, "redis": "up"})
    status, _ = await api.call("GET", "/metrics", signature=None)
    assert status == 200


# ---- bad input ---------------------------------------------------------------------------

BAD_PURCHASES = [
    b"",
    b"not json",
    b'{"receipt": "receipt-0009", "user": "ann", "package": "coins_70"',
    b"[]",
    b'"receipt-0009"',
    b"null",
    b'{"user": "ann", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "ann"}',
    b'{"receipt": "short", "user": "ann", "package": "coins_70"}',
    b'{"receipt": "' + b"r" * 129 + b'", "user": "ann", "package": "coins_70"}',
    b'{"receipt": "receipt 0009", "user": "ann", "package": "coins_70"}',
    b'{"receipt": 12345678, "user": "ann", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "' + b"u" * 65 + b'", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "ann/bob", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "\\u00e9", "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": null, "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": ["ann"], "package": "coins_70"}',
    b'{"receipt": "receipt-0009", "user": "ann", "package": 70}',
    b'{"receipt": "receipt-0009", "user": "ann", "package": "coins_70", "adult": "true"}',
    b'{"receipt": "receipt-0009", "user": "ann", "package": "coins_70", "adult": 1}',
    b'{"receipt": "receipt-0009", "user": "ann", "package": "coins_70", "adult": null}',
    b'\xff\xfe{"receipt": "receipt-0009"}',
]

BAD_REFUNDS = [
    b"{}",
    b'{"receipt": 1}',
    b'{"receipt": "receipt-0001 "}',
    b'{"receipt": "short"}',
    b'["receipt-0001"]',
    b'{"receipt": "receipt-0001"',
]


def payout_body(
    diamonds: bytes, key: bytes = b'"payout-key-1"', creator: bytes = b'"cara"'
) -> bytes:
    """A payout request as raw JSON text, so values no encoder would write can be sent."""
    return b'{"creator": ' + creator + b', "diamonds": ' + diamonds + b', "key": ' + key + b"}"


BAD_PAYOUTS = [
    payout_body(b"10000.0"),
    payout_body(b"1e4"),
    payout_body(b"1.0e4"),
    payout_body(b'"10000"'),
    payout_body(b"true"),
    payout_body(b"false"),
    payout_body(b"null"),
    payout_body(b"[10000]"),
    payout_body(b"0"),
    payout_body(b"-10000"),
    payout_body(b"-0.0"),
    payout_body(b"1000000000001"),
    payout_body(b"9007199254740993"),
    payout_body(b"18446744073709551616"),
    payout_body(b"1e309"),
    payout_body(b"-1e309"),
    payout_body(b"NaN"),
    payout_body(b"Infinity"),
    payout_body(b"10000", key=b'"short"'),
    payout_body(b"10000", key=b'"' + b"k" * 65 + b'"'),
    payout_body(b"10000", key=b'"payout:key:1"'),
    payout_body(b"10000", key=b'"payout.key.1"'),
    payout_body(b"10000", key=b"12345678"),
    payout_body(b"10000", key=b"null"),
    payout_body(b"10000", creator=b'""'),
    payout_body(b"10000", creator=b'"ca ra"'),
    payout_body(b"10000", creator=b"7"),
    b'{"creator": "cara", "key": "payout-key-1"}',
    b'{"creator": "cara", "diamonds": 10000}',
    b'{"diamonds": 10000, "key": "payout-key-1"}',
]


@pytest.mark.parametrize(
    ("path", "raw"),
    [("/v1/purchases", raw) for raw in BAD_PURCHASES]
    + [("/v1/refunds", raw) for raw in BAD_REFUNDS]
    + [("/v1/payouts", raw) for raw in BAD_PAYOUTS],
)
async def test_bad_input_is_400_and_changes_nothing(
    api: Api, rich_creator: str, redis_snapshot: Snapshot, path: str, raw: bytes
) -> None:
    before = await redis_snapshot()
    status, body = await api.call("POST", path, raw)
    assert (status, body["error"]) == (400, "bad_request"), body
    assert set(body) == {"error", "message"} and body["message"]
    assert await redis_snapshot() == before


async def test_unknown_fields_are_ignored(api: Api) -> None:
    body = {"receipt": "receipt-0001", "user": "ann", "package": "coins_70", "note": "x"}
    assert await api.call("POST", "/v1/purchases", body) == (200, {"coins": 70, "credited": True})


async def test_body_over_64_kib_is_413(api: Api, redis_snapshot: Snapshot) -> None:
    body = {"receipt": "receipt-0001", "user": "ann", "package": "coins_70", "pad": "x" * 65536}
    before = await redis_snapshot()
    status, reply = await api.call("POST", "/v1/purchases", body)
    assert (status, reply["error"]) == (413, "payload_too_large")
    assert await redis_snapshot() == before
    fits = {**body, "pad": "x" * (65536 - 200)}
    assert await api.call("POST", "/v1/purchases", fits) == (200, {"coins": 70, "credited": True})


async def test_chunked_body_over_64_kib_is_413(api: Api, redis_snapshot: Snapshot) -> None:
    raw = orjson.dumps(
        {"receipt": "receipt-0001", "user": "ann", "package": "coins_70", "pad": "x" * 70000}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 8192):
            yield raw[start : start + 8192]

    signature = sign_at(api.clock, "POST", "/v1/purchases", raw)
    headers = {SIGNATURE_HEADER: signature, "Content-Type": "application/json"}
    async with api.http.post(
        api.base_url + "/v1/purchases", data=chunks(), headers=headers
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"
    assert await redis_snapshot() == {}


async def test_unknown_route_is_404_and_wrong_method_405(api: Api) -> None:
    for path in ("/v1/nope", "/", "/v1/wallets/ann/", "/v2/purchases"):
        status, body = await api.call("GET", path)
        assert (status, body["error"]) == (404, "not_found"), path
    for method, path in [
        ("GET", "/v1/purchases"),
        ("DELETE", "/v1/wallets/ann"),
        ("POST", "/v1/catalog"),
        ("HEAD", "/v1/wallets/ann"),
        ("GET", "/v1/wallets/ann/limit"),
        ("PUT", "/v1/payouts"),
    ]:
        status, body = await api.call(method, path, b"{}")
        assert status == 405, (method, path)
        assert method == "HEAD" or body["error"] == "method_not_allowed"
        assert "Allow" in api.headers


async def test_unexpected_failure_is_500_logged_once(
    api: Api, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await redis_client.hset(
        keys.SINGLE.wallet("ann"), "coins", "not-a-number"
    )  # a corrupted wallet
    with caplog.at_level(logging.ERROR):
        status, body = await api.call("GET", "/v1/wallets/ann")
    assert (status, body) == (500, {"error": "internal", "message": "internal error"})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert await api.call("GET", "/v1/wallets/bob") == (200, wallet_view("bob"))


# ---- health and metrics ------------------------------------------------------------------


async def test_healthz_follows_redis(
    tmp_path: Path, catalog: Catalog, metrics: Metrics, clock: Clock
) -> None:
    second = EmbeddedRedis(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(second.url, socket_connect_timeout=1, socket_timeout=1)
    try:
        wallet = Wallet(client, catalog.economics, metrics=metrics)
        await wallet.load_scripts()
        app = build_admin_app(
            wallet=wallet,
            catalog=catalog,
            redis=client,
            webhook_secret=SECRET,
            metrics=metrics,
            clock=clock,
        )
        async with AdminServer(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
            api = Api(http, server.url, clock)
            assert await api.call("GET", "/healthz", signature=None) == (
                200,
                {"ok": True, "redis": "up"},
            )
            second.stop()
            assert await api.call("GET", "/healthz", signature=None) == (
                503,
                {"ok": False, "redis": "down"},
            )
            # Money routes say so too, and a retry with the same receipt is safe.
            status, body = await api.call(
                "POST",
                "/v1/purchases",
                {"receipt": "receipt-0001", "user": "ann", "package": "coins_70"},
            )
            assert (status, body["error"]) == (503, "unavailable")
    finally:
        await client.aclose()
        second.stop()


async def test_metrics_count_every_response(api: Api) -> None:
    await api.buy("ann", "coins_70", "receipt-0001")
    await api.call("POST", "/v1/purchases", b"{}", signature=None)
    await api.call("GET", "/v1/wallets/ann")
    await api.call("GET", "/nowhere")
    status, text = await api.call("GET", "/metrics", signature=None)
    assert status == 200
    assert api.headers["Content-Type"].startswith("text/plain")
    counted = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("giftstream_http_requests_total{")
    }
    assert counted == {
        'giftstream_http_requests_total{route="/v1/purchases",status="200"}': 1.0,
        'giftstream_http_requests_total{route="/v1/purchases",status="401"}': 1.0,
        'giftstream_http_requests_total{route="/v1/wallets/{user}",status="200"}': 1.0,
        'giftstream_http_requests_total{route="unmatched",status="404"}': 1.0,
    }
