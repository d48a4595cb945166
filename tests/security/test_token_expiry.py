"""Attacks on token checks (PROTOCOL.md 2.1 r2), over real sockets: a connection outliving its
token, clocks that disagree, and tokens minted for another audience or by another issuer."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest

from giftstream.server.app import App
from giftstream.server.cli import main as cli_main
from giftstream.server.money.catalog import Catalog
from giftstream.server.realtime.connection import EXPIRED_REASON
from tests.conftest import JWT_SECRET, make_settings
from tests.helpers import TokenMaker, WsClient

AUDIENCE = "giftstream"
ISSUER = "https://login.example"


def claims_token(**claims: Any) -> str:
    """A token signed with the test secret, claims as given around a good `sub` and `exp`."""
    now = int(time.time())
    return jwt.encode({"sub": "ann", "exp": now + 3600, **claims}, JWT_SECRET, algorithm="HS256")


@pytest.fixture
def node_with(redis_url: str, data_dir: Path, catalog: Catalog) -> Callable[..., Any]:
    """`async with node_with(jwt_leeway_s=0) as node`: a node with some settings changed."""

    @asynccontextmanager
    async def start(**settings: Any) -> AsyncIterator[App]:
        base = make_settings(redis_url, data_dir)
        async with App(dataclasses.replace(base, **settings), catalog) as node:
            yield node

    return start


async def hello_closes_with(node: App, token: str) -> tuple[int | None, str]:
    client = await WsClient.open(node.ws_url)
    await client.send({"type": "hello", "token": token})
    code = await client.closed_with(timeout=10)
    return code, client.conn.close_reason or ""


async def welcomed(node: App, token: str) -> bool:
    client = await WsClient.open(node.ws_url)
    reply = await client.request({"type": "hello", "token": token}, timeout=10)
    await client.close()
    return bool(reply["type"] == "welcome")


async def test_a_token_expiring_mid_session_closes_4401(
    node_with: Callable[..., Any], tokens: TokenMaker
) -> None:
    async with node_with(jwt_leeway_s=0.0) as node:
        # a token good for 2 s (exp is whole seconds: 1 to 2 s from now) ...
        client, _ = await WsClient.login(node.ws_url, tokens("ann", ttl_s=2))
        lasting, _ = await WsClient.login(node.ws_url, tokens("bob", ttl_s=3600))
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        # ... ends its connection once it has expired, whatever the client does
        assert await client.closed_with(timeout=30) == 4401
        assert client.conn.close_reason == EXPIRED_REASON
        assert (await lasting.request({"type": "ping"}))["type"] == "pong"  # others stay
        await lasting.close()


async def test_a_token_issued_a_little_ahead_of_our_clock_is_accepted(app: App) -> None:
    """A login service whose clock runs 5 s ahead: ordinary skew, within the default 30 s."""
    ahead = int(time.time()) + 5
    assert await welcomed(app, claims_token(iat=ahead, nbf=ahead))


async def test_a_token_issued_far_ahead_of_our_clock_is_refused(app: App) -> None:
    ahead = int(time.time()) + 60
    code, reason = await hello_closes_with(app, claims_token(iat=ahead))
    assert code == 4401 and "not yet valid" in reason


async def test_a_token_expired_within_the_leeway_is_accepted_and_past_it_refused(
    app: App,
) -> None:
    now = int(time.time())
    assert await welcomed(app, claims_token(exp=now - 5))
    code, reason = await hello_closes_with(app, claims_token(exp=now - 60))
    assert (code, reason) == (4401, "token expired")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "another-service", "iss": ISSUER}, "token audience is not this server's"),
        ({"iss": ISSUER}, 'invalid token: Token is missing the "aud" claim'),
        ({"aud": AUDIENCE, "iss": "https://evil.example"}, "token issuer is not the configured"),
        ({"aud": AUDIENCE}, 'invalid token: Token is missing the "iss" claim'),
    ],
    ids=["wrong-aud", "no-aud", "wrong-iss", "no-iss"],
)
async def test_audience_and_issuer_when_configured_must_match(
    node_with: Callable[..., Any], claims: dict[str, Any], reason: str
) -> None:
    async with node_with(jwt_audience=AUDIENCE, jwt_issuer=ISSUER) as node:
        assert await welcomed(node, claims_token(aud=AUDIENCE, iss=ISSUER))
        assert await welcomed(node, claims_token(aud=["other", AUDIENCE], iss=ISSUER))
        code, said = await hello_closes_with(node, claims_token(**claims))
        assert code == 4401 and said.startswith(reason), said


async def test_a_token_naming_an_audience_is_refused_where_none_is_configured(app: App) -> None:
    """RFC 7519 4.1.3: a token meant for another audience is not taken here."""
    code, reason = await hello_closes_with(app, claims_token(aud="another-service"))
    assert (code, reason) == (4401, "token audience is not this server's")


async def test_the_token_command_mints_with_the_configured_audience_and_issuer(
    node_with: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--jwt-secret", JWT_SECRET, "--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER]
    assert cli_main(["token", "--user", "ann", *flags]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (claims["aud"], claims["iss"]) == (AUDIENCE, ISSUER)
    async with node_with(jwt_audience=AUDIENCE, jwt_issuer=ISSUER) as node:
        assert await welcomed(node, token)
