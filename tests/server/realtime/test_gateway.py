"""The connection's life over real sockets: upgrade, hello, limits and every close code."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import jwt
import pytest
from websockets.exceptions import InvalidStatus

from giftstream.server.app import App
from giftstream.server.money.catalog import Catalog
from tests.conftest import JWT_SECRET, make_settings
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient


async def test_hello_gets_exact_welcome(app: App, tokens: TokenMaker, admin: AdminClient) -> None:
    await admin.buy("ann", "coins_700")
    before = int(time.time() * 1000)
    client, welcome = await WsClient.login(app.ws_url, tokens("ann", name="Ann"))
    ts = welcome.pop("ts")
    assert welcome == {
        "type": "welcome",
        "user": "ann",
        "name": "Ann",
        "coins": 700,
        "diamonds": 0,
        "protocol": 1,
    }
    assert before <= ts <= int(time.time() * 1000)
    await client.close()


async def test_reply_echoes_integer_and_string_ids(app: App, tokens: TokenMaker) -> None:
    client, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await client.send({"type": "ping", "id": 7})
    pong = await client.next()
    assert pong["type"] == "pong" and pong["id"] == 7 and isinstance(pong["ts"], int)
    await client.send({"type": "ping", "id": "abc"})
    assert (await client.next())["id"] == "abc"
    await client.send({"type": "ping"})
    assert "id" not in await client.next()
    await client.close()


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda t: "not-a-jwt", id="garbage"),
        pytest.param(lambda t: t("ann", ttl_s=-120), id="expired"),  # past the leeway
        pytest.param(
            lambda t: jwt.encode({"sub": "ann", "exp": 2**40}, "other-secret-0123456789"),
            id="wrong-secret",
        ),
        pytest.param(
            lambda t: jwt.encode({"sub": "ann", "exp": 2**40}, None, algorithm="none"),
            id="alg-none",
        ),
        pytest.param(
            lambda t: jwt.encode({"sub": "ann", "exp": 2**40}, JWT_SECRET, algorithm="HS512"),
            id="alg-hs512",
        ),
        pytest.param(lambda t: jwt.encode({"sub": "ann"}, JWT_SECRET), id="no-exp"),
        pytest.param(lambda t: jwt.encode({"sub": "a b", "exp": 2**40}, JWT_SECRET), id="bad-sub"),
        pytest.param(
            lambda t: jwt.encode({"sub": "ann", "exp": 2**40, "role": "admin"}, JWT_SECRET),
            id="bad-role",
        ),
        pytest.param(lambda t: "", id="empty"),
    ],
)
async def test_bad_tokens_close_4401(
    app: App, tokens: TokenMaker, make_token: Callable[[TokenMaker], str]
) -> None:
    client = await WsClient.open(app.ws_url)
    await client.send({"type": "hello", "token": make_token(tokens)})
    assert await client.closed_with() == 4401


async def test_first_message_must_be_hello(app: App) -> None:
    client = await WsClient.open(app.ws_url)
    await client.send({"type": "join", "room": "cara"})
    assert await client.closed_with() == 4401


async def test_bad_frame_before_hello_is_answered_then_hello_still_works(
    app: App, tokens: TokenMaker
) -> None:
    client = await WsClient.open(app.ws_url)
    await client.send("not json")
    error = await client.next()
    assert error["type"] == "error" and error["code"] == "bad_request"
    await client.send({"type": "hello", "token": tokens("ann")})
    assert (await client.next())["type"] == "welcome"
    await client.close()


async def test_no_hello_in_time_closes_4408(make_app: Callable[..., App]) -> None:
    async with make_app(hello_timeout_s=0.3) as node:
        client = await WsClient.open(node.ws_url)
        assert await client.closed_with(timeout=3) == 4408


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (b"\x00\x01binary", "binary"),
        ('{"type":"ping","pad":"' + "x" * 4100 + '"}', "4 KiB"),
        ("[1,2,3]", "object"),
        ("{nope", "JSON"),
        ('{"type":"teleport"}', "type"),
    ],
)
async def test_bad_frames_get_bad_request(
    app: App, tokens: TokenMaker, frame: str | bytes, what: str
) -> None:
    client, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await client.send(frame)
    error = await client.next()
    assert error["type"] == "error" and error["code"] == "bad_request", error
    assert error["message"]
    # the connection stays usable
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await client.close()


async def test_frame_of_exactly_4096_bytes_is_accepted(app: App, tokens: TokenMaker) -> None:
    client, _ = await WsClient.login(app.ws_url, tokens("ann"))
    head = '{"type":"ping","id":"x","pad":"'
    frame = head + "x" * (4096 - len(head) - 2) + '"}'
    assert len(frame.encode()) == 4096
    await client.send(frame)
    assert (await client.next())["type"] == "pong"
    await client.close()


async def test_second_hello_is_refused(app: App, tokens: TokenMaker) -> None:
    client, _ = await WsClient.login(app.ws_url, tokens("ann"))
    reply = await client.request({"type": "hello", "token": tokens("bob")})
    assert reply["code"] == "bad_request"
    await client.close()


async def test_message_rate_limit_then_flood_close(make_app: Callable[..., App]) -> None:
    """The wiring of the rule `test_connection` checks with injected time (there at 1 a
    second; here no message comes back while the test runs, however slow the machine)."""
    async with make_app(
        messages_per_s=0.01, messages_burst=5, flood_strikes=3, flood_strikes_per_s=0.01
    ) as node:
        token = TokenMaker(JWT_SECRET)("ann")
        client, _ = await WsClient.login(node.ws_url, token)  # hello took one message
        for _ in range(4):
            await client.send({"type": "ping"})
        codes = []
        for n in range(3):
            await client.send({"type": "ping", "id": f"over-{n}"})
        replies = [await client.next() for _ in range(7)]
        codes = [reply.get("code") for reply in replies]
        assert codes[:4] == [None] * 4
        assert codes[4:] == ["rate_limited"] * 3
        # each refusal echoes its request's id, so a client knows which request to retry
        assert [reply["id"] for reply in replies[4:]] == ["over-0", "over-1", "over-2"]
        await client.send({"type": "ping"})  # the fourth strike
        assert await client.closed_with() == 4429


async def test_flood_of_bad_frames_closes_4429(make_app: Callable[..., App]) -> None:
    async with make_app(flood_strikes=5, flood_strikes_per_s=0.01) as node:
        client, _ = await WsClient.login(node.ws_url, TokenMaker(JWT_SECRET)("ann"))
        for _ in range(10):
            await client.send(b"\x00")
        assert await client.closed_with() == 4429


async def test_flood_of_refused_requests_closes_4429(make_app: Callable[..., App]) -> None:
    """Refusals a handler decides (here a second hello) are strikes too, and each is
    answered before the close."""
    async with make_app(flood_strikes=2, flood_strikes_per_s=0.01) as node:
        tokens = TokenMaker(JWT_SECRET)
        client, _ = await WsClient.login(node.ws_url, tokens("ann"))
        for n in range(3):
            await client.send({"type": "hello", "token": tokens("ann"), "id": f"again-{n}"})
        assert await client.closed_with() == 4429
        refused = [(f["id"], f["code"]) for f in client.unread]
        assert refused == [(f"again-{n}", "bad_request") for n in range(3)]


async def test_origin_allow_list(redis_url: str, data_dir: Path, catalog: Catalog) -> None:
    settings = make_settings(redis_url, data_dir)
    settings = type(settings)(
        **{
            **{f: getattr(settings, f) for f in settings.__slots__},
            "allowed_origins": ("https://app.example",),
        }
    )
    async with App(settings, catalog) as node:
        with pytest.raises(InvalidStatus) as refused:
            await WsClient.open(node.ws_url, origin="https://evil.example")
        assert refused.value.response.status_code == 403
        allowed = await WsClient.open(node.ws_url, origin="https://app.example")
        await allowed.close()
        native = await WsClient.open(node.ws_url)  # apps send no Origin
        await native.close()


async def test_plain_pages_on_the_public_port(app: App) -> None:
    base = app.ws_url.replace("ws://", "http://").removesuffix("/ws")
    async with aiohttp.ClientSession() as http:
        for path, kind in [
            ("/", "text/html"),
            ("/?room=cara", "text/html"),
            ("/ops", "text/html"),
            ("/static/viewer.js", "text/javascript"),
            ("/static/client.js", "text/javascript"),
            ("/static/ops.js", "text/javascript"),
            ("/static/style.css", "text/css"),
            ("/static/gifts.css", "text/css"),
        ]:
            async with http.get(base + path) as response:
                assert response.status == 200, path
                assert response.headers["Content-Type"].startswith(kind), path
                assert response.headers["Cache-Control"] == "no-cache"
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                etag = response.headers["ETag"]
                assert await response.read()
            async with http.get(base + path, headers={"If-None-Match": etag}) as response:
                assert response.status == 304, path
                assert await response.read() == b""
        async with http.get(base + "/") as response:
            assert "/static/viewer.js" in await response.text()
        for missing in (
            "/nope",
            "/static/",
            "/static/nope.js",
            "/static/../pyproject.toml",
            "/static/%2e%2e/realtime/pages.py",
            "/static/..%2fapp.py",
            "/static//etc/passwd",
            "/index.html",
            "/ops/",
        ):
            async with http.get(base + missing) as response:
                assert response.status == 404, missing


async def test_slow_consumer_is_closed_4008(make_app: Callable[..., App]) -> None:
    async with make_app(
        max_backlog_bytes=64 * 1024,
        gifts_per_s=1000.0,
        gifts_burst=1000,
        user_gifts_per_s=1000.0,
        user_gifts_burst=1000,
    ) as node:
        tokens = TokenMaker(JWT_SECRET)
        creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
        await creator.request({"type": "go_live", "title": "t"})
        # a viewer in the room whose socket then stops reading: tiny receive queue
        slow = await WsClient.open(node.ws_url, max_queue=1)
        await slow.request({"type": "hello", "token": tokens("sid")})
        await slow.request({"type": "join", "room": "cara"})
        slow.conn.transport.pause_reading()
        watcher, _ = await WsClient.login(node.ws_url, tokens("otto", "ops"))
        await watcher.request({"type": "watch", "rooms": ["cara"]})
        closes_before = slow_consumer_closes(node)
        # room events big enough to fill the socket buffers quickly; each flush writes them
        # at once, so the bound is passed (or not) by the time it returns: no waiting
        for round_ in range(400):
            room = node.hub.rooms["cara"]
            for _ in range(20):

                def viewers(seq: int, n: int = round_) -> Frame:
                    return {
                        "type": "viewers",
                        "room": "cara",
                        "seq": seq,
                        "count": n,
                        "pad": "x" * 2000,
                    }

                node.hub.publish(room, viewers)
            await node.hub.flush()
            if slow_consumer_closes(node) > closes_before:
                break
            # the reading watcher reads what was sent so far (its send buffer is small too)
            assert (await watcher.request({"type": "ping"}))["type"] == "pong"
        assert slow_consumer_closes(node) == closes_before + 1
        slow.conn.transport.resume_reading()
        assert await slow.closed_with(timeout=15) == 4008
        # the room and the reading watcher were not held back
        assert (await watcher.request({"type": "ping"}))["type"] == "pong"
        await watcher.close()
        await creator.close()


def slow_consumer_closes(node: App) -> float:
    """The node's count of 4008 closes, as /metrics shows it."""
    closes = node.metrics.registry.get_sample_value("giftstream_slow_consumer_closes_total")
    assert closes is not None
    return closes


async def test_shutdown_closes_sockets_1001(make_app: Callable[..., App]) -> None:
    node = make_app()
    await node.__aenter__()
    client, _ = await WsClient.login(node.ws_url, TokenMaker(JWT_SECRET)("ann"))
    await node.shutdown()
    assert await client.closed_with() == 1001


async def test_keepalive_pings_drop_a_dead_peer(make_app: Callable[..., App]) -> None:
    async with make_app(
        ping_interval_s=0.2, ping_timeout_s=0.3, close_timeout_s=0.3, stats_interval_s=0.1
    ) as node:
        tokens = TokenMaker(JWT_SECRET)
        dead, _ = await WsClient.login(node.ws_url, tokens("bob"))
        dead.conn.transport.pause_reading()  # a phone gone out of coverage: no pong
        alive, _ = await WsClient.login(node.ws_url, tokens("ann", "ops"))
        await alive.request({"type": "watch", "rooms": ["*"]})
        # the node's connection count, as its stats line says it: the dead peer is gone
        await alive.expect("stats", timeout=10, connections=1)
        assert node.node_state.connections == 1
        assert (await alive.request({"type": "ping"}))["type"] == "pong"
        await alive.close()


@pytest.mark.parametrize("hello", [{"type": "hello"}, {"type": "hello", "token": 7}])
async def test_hello_without_a_token_string_closes_4401(app: App, hello: Frame) -> None:
    client = await WsClient.open(app.ws_url)
    await client.send(hello)
    assert await client.closed_with() == 4401
