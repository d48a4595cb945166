"""Attacks on the internal API's signature, over a real socket, on a real Wallet and Redis:
a signed request replayed on another route, user, query or time is refused 401 and moves
nothing; revision 1's signature and malformed headers are refused, never a 500."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.protocol.signing import SIGNATURE_HEADER, sign_request
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.admin import AdminServer, build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.wallet import Wallet
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import AdminClient
from tests.processes import ServerProcess

SECRET = "security-test-secret-0123456789ab"
OLD_SECRET = "security-old-secret-0123456789abc"
START_MS = 1_764_000_000_000
EMPTY: tuple[dict[Any, Any], int, list[Any]] = ({}, 0, [])  # no wallet, no ledger, no key


class Clock:
    """The API's clock in ms, moved by hand; callers sign with its seconds."""

    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms

    @property
    def now_s(self) -> int:
        return self.now_ms // 1000


class Caller:
    """Raw HTTP to the admin API with a header the test chooses: a captured one replayed."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, clock: Clock) -> None:
        self.http = http
        self.base_url = base_url
        self.clock = clock

    def sign(
        self, method: str, path: str, body: bytes, *, secret: str = SECRET, skew_s: int = 0
    ) -> str:
        return sign_request(secret, method, path, body, self.clock.now_s + skew_s)

    async def send(
        self, method: str, path: str, body: bytes, signature: str | list[str] | None
    ) -> tuple[int, Any]:
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        for value in [signature] if isinstance(signature, str) else signature or []:
            headers.append((SIGNATURE_HEADER, value))
        async with self.http.request(
            method, self.base_url + path, data=body, headers=headers
        ) as response:
            return response.status, orjson.loads(await response.read())

    async def signed(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        return await self.send(method, path, body, self.sign(method, path, body))


Serve = Callable[..., AbstractAsyncContextManager[Caller]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def wallet(redis_client: aioredis.Redis, catalog: Catalog) -> AsyncIterator[Wallet]:
    money = Wallet(redis_client, catalog.economics, metrics=Metrics())
    await money.load_scripts()
    yield money
    await money.drain()


@pytest.fixture
def serve(wallet: Wallet, catalog: Catalog, redis_client: aioredis.Redis, clock: Clock) -> Serve:
    """`async with serve(previous=...) as caller`: the admin API on a free loopback port."""

    @asynccontextmanager
    async def running(
        previous: str | None = None, metrics: Metrics | None = None
    ) -> AsyncIterator[Caller]:
        app = build_admin_app(
            wallet=wallet,
            catalog=catalog,
            redis=redis_client,
            webhook_secret=SECRET,
            webhook_secret_previous=previous,
            metrics=metrics or Metrics(),
            clock=clock,
        )
        async with AdminServer(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
            yield Caller(http, server.url, clock)

    return running


@pytest.fixture
async def caller(serve: Serve) -> AsyncIterator[Caller]:
    async with serve() as running:
        yield running


async def money_state(redis: aioredis.Redis) -> tuple[dict[Any, Any], int, list[Any]]:
    """Every wallet, the ledger's length and every key's name (receipts, refunds): what a
    refused request must leave as it was."""
    wallets = {}
    async for key in redis.scan_iter(match=keys.SINGLE.wallet_match):
        wallets[key] = await redis.hgetall(key)
    return wallets, await redis.xlen(keys.LEDGER), sorted(await redis.keys("*"))


def purchase_body(receipt: str = "receipt-0001", user: str = "ann") -> bytes:
    return orjson.dumps({"receipt": receipt, "user": user, "package": "coins_70"})


async def assert_refused(reply: tuple[int, Any], why: str = "") -> None:
    status, body = reply
    assert (status, body["error"]) == (401, "bad_signature"), body
    assert why in body["message"], body


# ---- replays on another route, user, path or query ---------------------------------------


async def test_signed_purchase_replayed_as_a_refund_is_refused(
    caller: Caller, redis_client: aioredis.Redis
) -> None:
    """A refund reads only `receipt` from its body, so under revision 1 (the body alone
    signed) a captured purchase sent to /v1/refunds took the coins back."""
    body = purchase_body()
    captured = caller.sign("POST", "/v1/purchases", body)
    assert await caller.send("POST", "/v1/purchases", body, captured) == (
        200,
        {"coins": 70, "credited": True},
    )
    before = await money_state(redis_client)
    await assert_refused(await caller.send("POST", "/v1/refunds", body, captured), "does not match")
    assert await money_state(redis_client) == before
    # The same bytes signed for /v1/refunds do refund: the signature alone stopped the replay.
    status, refund = await caller.signed("POST", "/v1/refunds", body)
    assert (status, refund["refunded"], refund["coins"]) == (200, True, 0)


async def test_signed_limit_replayed_on_another_user_is_refused(
    caller: Caller, redis_client: aioredis.Redis
) -> None:
    body = orjson.dumps({"daily_limit": 0})
    captured = caller.sign("PUT", "/v1/wallets/ann/limit", body)
    status, ann = await caller.send("PUT", "/v1/wallets/ann/limit", body, captured)
    assert (status, ann["daily_limit"]) == (200, 0)
    before = await money_state(redis_client)
    await assert_refused(await caller.send("PUT", "/v1/wallets/bob/limit", body, captured))
    assert await money_state(redis_client) == before
    status, bob = await caller.signed("GET", "/v1/wallets/bob")
    assert (status, bob["daily_limit"]) == (200, None)


async def test_get_signature_replayed_on_another_path_or_query_is_refused(caller: Caller) -> None:
    captured = caller.sign("GET", "/v1/wallets/ann", b"")
    assert (await caller.send("GET", "/v1/wallets/ann", b"", captured))[0] == 200
    await assert_refused(await caller.send("GET", "/v1/wallets/bob", b"", captured))
    await assert_refused(await caller.send("GET", "/v1/catalog", b"", captured))
    await assert_refused(await caller.send("GET", "/v1/wallets/ann?x=1", b"", captured))
    signed_query = caller.sign("GET", "/v1/wallets/ann?x=1", b"")
    assert (await caller.send("GET", "/v1/wallets/ann?x=1", b"", signed_query))[0] == 200
    await assert_refused(await caller.send("GET", "/v1/wallets/ann?x=2", b"", signed_query))


async def test_signature_replayed_with_another_method_is_refused(
    caller: Caller, redis_client: aioredis.Redis
) -> None:
    body = purchase_body()
    before = await money_state(redis_client)
    as_put = caller.sign("PUT", "/v1/purchases", body)
    await assert_refused(await caller.send("POST", "/v1/purchases", body, as_put))
    assert await money_state(redis_client) == before


# ---- time --------------------------------------------------------------------------------


@pytest.mark.parametrize(("skew_s", "word"), [(-301, "behind"), (301, "ahead of")])
async def test_stale_or_future_t_is_refused(
    caller: Caller, redis_client: aioredis.Redis, skew_s: int, word: str
) -> None:
    body = purchase_body()
    header = caller.sign("POST", "/v1/purchases", body, skew_s=skew_s)
    await assert_refused(await caller.send("POST", "/v1/purchases", body, header), word)
    assert await money_state(redis_client) == EMPTY


@pytest.mark.parametrize("skew_s", [-300, -1, 0, 299, 300])
async def test_t_within_the_window_is_accepted(caller: Caller, skew_s: int) -> None:
    body = purchase_body()
    header = caller.sign("POST", "/v1/purchases", body, skew_s=skew_s)
    assert await caller.send("POST", "/v1/purchases", body, header) == (
        200,
        {"coins": 70, "credited": True},
    )


async def test_a_captured_request_expires_with_the_servers_clock(
    caller: Caller, clock: Clock
) -> None:
    captured = caller.sign("GET", "/v1/wallets/ann", b"")
    clock.now_ms += 300_000
    assert (await caller.send("GET", "/v1/wallets/ann", b"", captured))[0] == 200
    clock.now_ms += 1_000
    await assert_refused(await caller.send("GET", "/v1/wallets/ann", b"", captured), "301 s")


# ---- secrets and revisions ---------------------------------------------------------------


async def test_previous_secret_is_accepted_only_when_configured(
    serve: Serve, redis_client: aioredis.Redis
) -> None:
    body = purchase_body()
    async with serve() as caller:
        old = caller.sign("POST", "/v1/purchases", body, secret=OLD_SECRET)
        await assert_refused(await caller.send("POST", "/v1/purchases", body, old))
    assert await money_state(redis_client) == EMPTY
    metrics = Metrics()
    async with serve(previous=OLD_SECRET, metrics=metrics) as caller:
        old = caller.sign("POST", "/v1/purchases", body, secret=OLD_SECRET)
        assert (await caller.send("POST", "/v1/purchases", body, old))[0] == 200
        assert metrics.registry.get_sample_value("giftstream_http_previous_secret_total") == 1
        assert (await caller.signed("GET", "/v1/wallets/ann"))[0] == 200  # the current one too
        assert metrics.registry.get_sample_value("giftstream_http_previous_secret_total") == 1
        wrong = caller.sign("GET", "/v1/wallets/ann", b"", secret="neither-secret-0123456789")
        await assert_refused(await caller.send("GET", "/v1/wallets/ann", b"", wrong))


async def test_a_caller_mid_rotation_may_send_both_signatures(serve: Serve) -> None:
    body = purchase_body()
    async with serve() as caller:  # the server has moved on; the caller sends old and new
        old = caller.sign("POST", "/v1/purchases", body, secret=OLD_SECRET)
        new_v1 = caller.sign("POST", "/v1/purchases", body).partition(",")[2]
        assert (await caller.send("POST", "/v1/purchases", body, f"{old},{new_v1}"))[0] == 200


async def test_revision_1_signature_is_refused(
    caller: Caller, redis_client: aioredis.Redis
) -> None:
    body = purchase_body()
    revision_1 = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    await assert_refused(await caller.send("POST", "/v1/purchases", body, revision_1), "revision 1")
    path_only = hmac.new(SECRET.encode(), b"/v1/wallets/ann", hashlib.sha256).hexdigest()
    await assert_refused(await caller.send("GET", "/v1/wallets/ann", b"", path_only), "revision 1")
    assert await money_state(redis_client) == EMPTY


MALFORMED = [
    "t=,v1=",
    "t=abc,v1=00",
    "v1=" + "0" * 64,
    "t=1764000000",
    "t=1764000000,v1=zz",
    "t=1764000000,t=1764000000,v1=" + "0" * 64,
    "t=-1,v1=" + "0" * 64,
    "t=99999999999999999999999,v1=" + "0" * 64,
    "t=1764000000,v2=" + "0" * 64,
    "t=1764000000;v1=" + "0" * 64,
    ",,,,",
    "=",
    "t=1764000000," + ",".join(["v1=" + "0" * 64] * 9),
    "t=1764000000,v1=" + "0" * 64 + "," + "x" * 1100,
]


@pytest.mark.parametrize("header", MALFORMED)
async def test_malformed_header_is_401_never_500(
    caller: Caller, redis_client: aioredis.Redis, header: str
) -> None:
    await assert_refused(await caller.send("POST", "/v1/purchases", purchase_body(), header))
    assert await money_state(redis_client) == EMPTY


async def test_non_ascii_and_repeated_headers_are_401(
    caller: Caller, redis_client: aioredis.Redis
) -> None:
    body = purchase_body()
    good = caller.sign("POST", "/v1/purchases", body)
    raw_headers = {SIGNATURE_HEADER: good[:-1].encode() + "é".encode()}
    status, reply = await send_raw(caller, body, raw_headers)
    assert (status, reply["error"]) == (401, "bad_signature")
    await assert_refused(await caller.send("POST", "/v1/purchases", body, [good, good]), "one")
    assert await money_state(redis_client) == EMPTY


async def send_raw(caller: Caller, body: bytes, headers: dict[str, bytes]) -> tuple[int, Any]:
    """A request whose header bytes are not ASCII, written on a plain socket."""
    address = urlsplit(caller.base_url)
    assert address.hostname and address.port
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        head = [
            b"POST /v1/purchases HTTP/1.1",
            b"Host: " + address.netloc.encode(),
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
            *(name.encode() + b": " + value for name, value in headers.items()),
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), orjson.loads(rest.partition(b"\r\n\r\n")[2])


# ---- the whole server: --webhook-secret-previous from the command line -------------------


async def test_serve_takes_the_previous_secret_from_flag_and_environment(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    without = ServerProcess(tmp_path / "a", "--redis-url", redis_url).start()
    try:
        async with AdminClient(without.admin_url, OLD_SECRET) as old:
            status, body = await old.call("GET", "/v1/wallets/ann")
            assert (status, body["error"]) == (401, "bad_signature")
    finally:
        without.stop()
    flag = ServerProcess(
        tmp_path / "b", "--redis-url", redis_url, "--webhook-secret-previous", OLD_SECRET
    ).start()
    try:
        async with AdminClient(flag.admin_url, OLD_SECRET) as old:
            await old.buy("ann", "coins_70", receipt="receipt-old-secret")
        async with AdminClient(flag.admin_url, WEBHOOK_SECRET) as new:
            assert (await new.call("GET", "/v1/wallets/ann"))[1]["coins"] == 70
        assert OLD_SECRET not in "".join(flag.log), "a secret must never be logged"
    finally:
        flag.stop()
    monkeypatch.setenv("GIFTSTREAM_WEBHOOK_SECRET_PREVIOUS", OLD_SECRET)
    env = ServerProcess(tmp_path / "c", "--redis-url", redis_url).start()
    try:
        async with AdminClient(env.admin_url, OLD_SECRET) as old:
            assert (await old.call("GET", "/v1/wallets/ann"))[1]["coins"] == 70
    finally:
        env.stop()
