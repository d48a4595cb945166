"""Attacks on the connection caps (PROTOCOL.md 2.1 r2), over real sockets: one address or one
user holding the node, silent sockets, and caps that leak on some close path. Loopback is one
address, so each test sets small caps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from websockets.exceptions import InvalidStatus

from giftstream.server.app import App
from tests.helpers import TokenMaker, WsClient

T = TypeVar("T")


def refused(node: App, reason: str) -> float:
    sample = node.metrics.registry.get_sample_value(
        "giftstream_connections_refused_total", {"reason": reason}
    )
    return sample or 0.0


async def upgrade_status(node: App) -> int:
    """The HTTP status the next upgrade gets: 101 when it became a WebSocket (closed again)."""
    try:
        client = await WsClient.open(node.ws_url)
    except InvalidStatus as refusal:
        return refusal.response.status_code
    await client.close()
    return 101


async def once_freed(attempt: Callable[[], Awaitable[T | None]], what: str) -> T:
    """`attempt()` until it succeeds (not None). The server frees a closed socket's place as
    its own side of the close ends, a moment after the client's side, so the first try may
    come too early; each try is a real round trip, bounded in count and time."""
    async with asyncio.timeout(20):
        for _ in range(500):
            result = await attempt()
            if result is not None:
                return result
    raise AssertionError(f"{what}: still refused after 500 tries")


async def open_admitted(node: App) -> WsClient | None:
    try:
        return await WsClient.open(node.ws_url)
    except InvalidStatus as refusal:
        assert refusal.response.status_code in (429, 503), refusal
        return None


async def login_admitted(node: App, token: str) -> WsClient | None:
    client = await open_admitted(node)
    if client is None:
        return None
    await client.send({"type": "hello", "token": token, "id": "h"})
    try:
        await client.expect("welcome", timeout=10)
    except AssertionError:
        assert await client.closed_with(timeout=10) == 4429
        return None
    return client


async def test_past_the_server_cap_the_upgrade_gets_503_until_a_socket_closes(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with make_app(max_connections=3, max_connections_per_ip=0) as node:
        held = [(await WsClient.login(node.ws_url, tokens(f"u{i}")))[0] for i in range(3)]
        assert await upgrade_status(node) == 503
        assert await upgrade_status(node) == 503
        assert refused(node, "server_full") == 2
        assert refused(node, "ip_cap") == 0
        for client in held:  # the held ones are served all the while
            assert (await client.request({"type": "ping"}))["type"] == "pong"
        await held.pop().close()
        again = await once_freed(lambda: open_admitted(node), "an upgrade after a close")
        await again.close()
        for client in held:
            await client.close()


async def test_past_the_address_cap_the_upgrade_gets_429_and_pages_still_answer(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with make_app(max_connections_per_ip=2) as node:
        held = [(await WsClient.login(node.ws_url, tokens(f"u{i}")))[0] for i in range(2)]
        assert await upgrade_status(node) == 429
        assert (refused(node, "ip_cap"), refused(node, "server_full")) == (1, 0)
        async with aiohttp.ClientSession() as http:  # only upgrades are capped
            async with http.get(f"http://127.0.0.1:{node.gateway.port}/healthz") as page:
                assert page.status == 200
        await held.pop().close()
        again = await once_freed(lambda: open_admitted(node), "an upgrade after a close")
        await again.close()
        await held.pop().close()


async def test_silent_websockets_count_against_their_address_until_the_hello_deadline(
    make_app: Callable[..., App],
) -> None:
    async with make_app(max_connections_per_ip=2, hello_timeout_s=1.0) as node:
        silent = [await WsClient.open(node.ws_url) for _ in range(2)]  # never say hello
        assert await upgrade_status(node) == 429
        for client in silent:
            assert await client.closed_with(timeout=30) == 4408
        again = await once_freed(lambda: open_admitted(node), "an upgrade after 4408")
        await again.close()


async def test_sockets_that_never_send_their_upgrade_count_against_their_address(
    make_app: Callable[..., App],
) -> None:
    async with make_app(max_connections_per_ip=2) as node:
        raw = [await asyncio.open_connection("127.0.0.1", node.gateway.port) for _ in range(2)]
        try:
            # accepted in the order they connected, so both are counted before this upgrade
            assert await upgrade_status(node) == 429
        finally:
            for _, writer in raw:
                writer.close()
                await writer.wait_closed()
        again = await once_freed(lambda: open_admitted(node), "an upgrade after raw closes")
        await again.close()


async def test_past_the_user_cap_the_hello_is_closed_4429(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with make_app(max_connections_per_user=2) as node:
        tabs = [(await WsClient.login(node.ws_url, tokens("ann")))[0] for _ in range(2)]
        third = await WsClient.open(node.ws_url)
        await third.send({"type": "hello", "token": tokens("ann")})
        assert await third.closed_with(timeout=10) == 4429
        assert third.conn.close_reason == "too many connections for this user"
        assert refused(node, "user_cap") == 1
        other, _ = await WsClient.login(node.ws_url, tokens("bob"))  # the cap is per user
        await tabs.pop().close()
        again = await once_freed(lambda: login_admitted(node, tokens("ann")), "a hello")
        for client in (again, other, *tabs):
            await client.close()


async def test_every_close_path_frees_its_place(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """Round after round of sockets ended every way there is; a leak on any path would fill
    the node's 4 places, and the last round could not open 4 again."""
    caps: dict[str, Any] = {"max_connections": 4, "max_connections_per_ip": 0}
    async with make_app(**caps, max_connections_per_user=1, hello_timeout_s=1.0) as node:
        for round_ in range(3):
            bye, _ = await WsClient.login(node.ws_url, tokens(f"bye{round_}"))
            await bye.close()  # the client closes
            bad = await WsClient.open(node.ws_url)
            await bad.send({"type": "hello", "token": "not-a-token"})
            assert await bad.closed_with(timeout=10) == 4401
            mute = await once_freed(lambda: open_admitted(node), "a socket")
            assert await mute.closed_with(timeout=30) == 4408  # never says hello
            token = tokens(f"twice{round_}")
            first = await once_freed(lambda: login_admitted(node, token), "a hello")  # noqa: B023
            second = await WsClient.open(node.ws_url)
            await second.send({"type": "hello", "token": token})
            assert await second.closed_with(timeout=10) == 4429  # past the user's cap
            await first.close()
            cut = await once_freed(lambda: open_admitted(node), "a socket")
            cut.conn.transport.abort()  # the client vanishes: no close handshake
            await cut.closed_with(timeout=10)
            held = [await once_freed(lambda: open_admitted(node), "a socket") for _ in range(4)]
            assert await upgrade_status(node) == 503  # refused sockets end too
            for client in held:
                await client.close()
        assert refused(node, "server_full") >= 3
        last = [await once_freed(lambda: open_admitted(node), "a socket") for _ in range(4)]
        assert await upgrade_status(node) == 503
        for client in last:
            await client.close()
