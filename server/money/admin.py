"""The internal HTTP API (PROTOCOL.md §3) for the platform's own services, on its own port.

Every route but /healthz and /metrics is signed (protocol/signing.py: the time, method, path
and raw body, with the webhook secret or, during a rotation, the previous one). The signature
is checked before the body is parsed, so a bad one changes nothing. Money rules live in
server/money/wallet.py; this module only authenticates, validates and maps refusals to statuses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeGuard

import orjson
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from giftstream.protocol.rules import ID_CHARS, ID_RULE, KEY_RULE, MAX_AMOUNT, is_id, is_key
from giftstream.protocol.signing import (
    SIGNATURE_HEADER,
    SignatureError,
    parse_signature_header,
    verify,
)
from giftstream.server.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from giftstream.server.money.boards import board_of
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.openapi import OPENAPI_PATH, openapi_document
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import LimitChange, Wallet
from giftstream.server.redis_cluster import RedisClient

__all__ = [
    "MAX_BODY_BYTES",
    "SIGNATURE_HEADER",
    "AdminServer",
    "build_admin_app",
    "http_status",
]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
HEALTH_TIMEOUT_S = 2.0  # a hung Redis must not hang the load balancer's probe
# Receipts take the ids' alphabet, longer (a payments backend's own ids).
RECEIPT = re.compile(f"[{ID_CHARS}]{{8,128}}")  # fullmatch, never match(...$)
UNMATCHED = "unmatched"  # the metrics label of requests no route took: bounded cardinality
# Probes and scrapers hold no secret; the API's description is no secret.
UNSIGNED_ROUTES = frozenset({"/healthz", "/metrics", OPENAPI_PATH})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], int]


# Every refusal's HTTP status: the one place they are mapped (PROTOCOL.md §3). The gift
# path's refusals never reach this API; they have a status all the same.
_HTTP_STATUS = {
    Reason.BAD_REQUEST: 400,
    Reason.BAD_COUNT: 400,
    Reason.BAD_SIGNATURE: 401,
    Reason.UNDERAGE: 403,
    Reason.UNKNOWN_RECEIPT: 404,
    Reason.UNKNOWN_ROOM: 404,
    Reason.RECEIPT_REUSED: 409,
    Reason.KEY_REUSED: 409,
    Reason.BALANCE_LIMIT: 409,
    Reason.INSUFFICIENT_COINS: 409,
    Reason.INSUFFICIENT_DIAMONDS: 409,
    Reason.DEBT: 409,
    Reason.SPENDING_LIMIT: 409,
    Reason.ROOM_NOT_LIVE: 409,  # no HTTP route settles gifts; mapped so every reason is
    Reason.PAYOUT_HELD: 409,  # the diamonds are there, not payable yet: the message says when
    Reason.PAYOUT_CAP: 429,  # a daily quota: the same request succeeds after 00:00 UTC
    Reason.BAD_VALUE: 422,
    Reason.UNKNOWN_PACKAGE: 422,
    Reason.BELOW_MINIMUM: 422,
    Reason.UNAVAILABLE: 503,
}


def http_status(refusal: Refusal) -> int:
    """The HTTP status that answers `refusal`."""
    return _HTTP_STATUS[refusal.reason]


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return _json(status, {"error": code, "message": message}, headers)


def _refused(refusal: Refusal) -> web.Response:
    return _error(http_status(refusal), refusal.code, refusal.message)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- reading a request ---------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. orjson refuses NaN, Infinity and numbers past a double."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refusal(Reason.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refusal(Reason.BAD_REQUEST, "body must be a JSON object")
    return body


def _string(
    body: dict[str, Any], name: str, valid: Callable[[object], TypeGuard[str]], what: str
) -> str:
    value = body.get(name)
    if not valid(value):
        raise Refusal(Reason.BAD_REQUEST, f"`{name}` must be {what}")
    return value


def _amount(body: dict[str, Any], name: str, low: int) -> int:
    """A JSON integer only: `type(...) is int` refuses bools, and floats (1.0, 1e3) stay floats."""
    value = body.get(name)
    if type(value) is not int or not low <= value <= MAX_AMOUNT:
        raise Refusal(
            Reason.BAD_REQUEST, f"`{name}` must be a JSON integer from {low} to {MAX_AMOUNT}"
        )
    return value


_RECEIPT_TEXT = f"8-128 characters of [{ID_CHARS}]"


def _is_receipt(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and RECEIPT.fullmatch(value) is not None


def _path_user(request: web.Request) -> str:
    user = request.match_info["user"]
    if not is_id(user):
        raise Refusal(Reason.BAD_REQUEST, f"the user id in the path must be {ID_RULE}")
    return user


async def _check_signature(
    request: web.Request, secrets: tuple[str, ...], now_s: int, metrics: Metrics
) -> None:
    """401 unless the signature is fresh and matches this method, path (with its query
    string, as sent) and raw body under one of `secrets` (current, then previous)."""
    headers = request.headers.getall(SIGNATURE_HEADER, [])
    if len(headers) > 1:  # which one would count is a guess: refuse rather than pick
        raise Refusal(Reason.BAD_SIGNATURE, f"send one {SIGNATURE_HEADER} header, not several")
    header = headers[0] if headers else None
    try:
        parse_signature_header(header)  # a malformed header is refused before the body is read
        body = await request.read()  # past client_max_size aiohttp raises 413 here
        used = verify(
            header,
            secrets=secrets,
            method=request.method,
            path=request.raw_path,
            body=body,
            now_s=now_s,
        )
    except SignatureError as exc:
        raise Refusal(Reason.BAD_SIGNATURE, str(exc)) from None
    if used > 0:
        metrics.http_previous_secret.inc()


# ---- the routes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Api:
    """One handler per route of PROTOCOL.md §3, over the parts they need."""

    wallet: Wallet
    catalog: Catalog
    redis: RedisClient
    metrics: Metrics
    clock: Clock

    async def purchase(self, request: web.Request) -> web.Response:
        body = await _body(request)
        receipt = _string(body, "receipt", _is_receipt, _RECEIPT_TEXT)
        user = _string(body, "user", is_id, ID_RULE)
        package_id = _string(body, "package", is_id, ID_RULE)
        adult = body.get("adult", True)  # absent: the payments backend vouches for its buyer
        if not isinstance(adult, bool):
            raise Refusal(Reason.BAD_REQUEST, "`adult` must be true or false when present")
        package = self.catalog.packages.get(package_id)
        if package is None:
            raise Refusal(Reason.UNKNOWN_PACKAGE, f"no coin package {package_id!r}")
        result = await self.wallet.purchase(
            receipt=receipt, user=user, package=package, adult=adult
        )
        return _json(200, result.as_wire())

    async def refund(self, request: web.Request) -> web.Response:
        body = await _body(request)
        receipt = _string(body, "receipt", _is_receipt, _RECEIPT_TEXT)
        result = await self.wallet.refund(receipt=receipt)
        return _json(200, result.as_wire())

    async def get_wallet(self, request: web.Request) -> web.Response:
        view = await self.wallet.wallet(_path_user(request))
        return _json(200, view.as_wire())

    async def put_limit(self, request: web.Request) -> web.Response:
        """Either limit or both: a field absent stays as it is, null clears it (an r1 body,
        `daily_limit` alone, leaves the weekly limit as it was)."""
        user = _path_user(request)
        body = await _body(request)
        if "daily_limit" not in body and "weekly_limit" not in body:
            raise Refusal(
                Reason.BAD_REQUEST,
                "`daily_limit` or `weekly_limit` is required: an integer or null",
            )
        limits: dict[str, LimitChange] = {}
        for name in ("daily_limit", "weekly_limit"):
            if name in body:
                limits[name] = None if body[name] is None else _amount(body, name, 0)
        view = await self.wallet.set_limits(user, **limits)
        return _json(200, view.as_wire())

    async def payout(self, request: web.Request) -> web.Response:
        body = await _body(request)
        creator = _string(body, "creator", is_id, ID_RULE)
        diamonds = _amount(body, "diamonds", 1)
        key = _string(body, "key", is_key, KEY_RULE)
        result = await self.wallet.payout(creator=creator, diamonds=diamonds, key=key)
        return _json(200, result.as_wire())

    async def get_leaderboard(self, request: web.Request) -> web.Response:
        """A board's top 10 (boards.py): 400 for a bad board or room (creators_day takes
        none), 404 `unknown_room` for a room never opened, else the entries (maybe none)."""
        rooms = request.query.getall("room", [])
        if len(rooms) > 1:
            raise Refusal(Reason.BAD_REQUEST, "send `room` once")
        board, room = board_of(request.match_info["board"], rooms[0] if rooms else None)
        entries = await self.wallet.boards.top(board, room)
        return _json(
            200,
            {"board": board.value, "room": room, "entries": [e.as_wire() for e in entries]},
        )

    async def get_openapi(self, request: web.Request) -> web.Response:
        return _json(200, openapi_document())

    async def get_catalog(self, request: web.Request) -> web.Response:
        return _json(200, self.catalog.as_wire())

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                if isinstance(self.redis, RedisCluster):  # up: every shard's master answers
                    await self.redis.ping(target_nodes=RedisCluster.PRIMARIES)
                else:
                    await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("healthz: Redis does not answer PING: %r", exc)
            return _json(503, {"ok": False, "redis": "down"})
        return _json(200, {"ok": True, "redis": "up"})

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )


_HTTP_CODES = {  # aiohttp's own refusals, as our error codes
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "this route does not take that method"),
    413: ("payload_too_large", f"the body is over {MAX_BODY_BYTES} bytes"),
}


def _answer_http_exception(exc: web.HTTPException) -> web.Response:
    code, message = _HTTP_CODES.get(exc.status, (exc.reason.lower().replace(" ", "_"), exc.reason))
    allow = exc.headers.get("Allow")
    return _error(exc.status, code, message, {"Allow": allow} if allow else None)


def build_admin_app(
    *,
    wallet: Wallet,
    catalog: Catalog,
    redis: RedisClient,
    webhook_secret: str,
    metrics: Metrics,
    clock: Clock | None = None,
    webhook_secret_previous: str | None = None,
) -> web.Application:
    """The internal API: signing, size limit, error mapping and counting in one middleware,
    so no handler can forget them. `clock` gives now in ms (tests move it by hand); the
    signature's time window is checked against it too. `webhook_secret_previous` is also
    accepted while the callers move to a new secret."""
    now_ms = clock or _now_ms
    api = _Api(wallet, catalog, redis, metrics, now_ms)
    secrets = (webhook_secret,) + ((webhook_secret_previous,) if webhook_secret_previous else ())

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else UNMATCHED
        try:
            if resource is not None and template not in UNSIGNED_ROUTES:
                await _check_signature(request, secrets, now_ms() // 1000, metrics)
            response = await handler(request)
        except Refusal as refusal:
            response = _refused(refusal)
        except web.HTTPException as exc:  # 404, 405 from the router; 413 from request.read()
            response = _answer_http_exception(exc)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Safe to retry: receipts and payout keys make a repeated request a replay.
            log.warning("internal API %s %s: Redis unavailable: %r", request.method, template, exc)
            response = _refused(
                Refusal(Reason.UNAVAILABLE, "storage unavailable; retry the same request")
            )
        except Exception:
            log.exception("internal API %s %s failed", request.method, request.path)
            response = _error(500, "internal", "internal error")
        metrics.http_requests.labels(route=template, status=str(response.status)).inc()
        return response

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    router = app.router
    router.add_post("/v1/purchases", api.purchase)
    router.add_post("/v1/refunds", api.refund)
    router.add_get("/v1/wallets/{user}", api.get_wallet, allow_head=False)
    router.add_put("/v1/wallets/{user}/limit", api.put_limit)
    router.add_post("/v1/payouts", api.payout)
    router.add_get("/v1/catalog", api.get_catalog, allow_head=False)
    router.add_get("/v1/leaderboards/{board}", api.get_leaderboard, allow_head=False)
    router.add_get("/healthz", api.healthz)  # HEAD too, for load balancers' probes
    router.add_get("/metrics", api.get_metrics, allow_head=False)
    router.add_get(OPENAPI_PATH, api.get_openapi, allow_head=False)
    return app


class AdminServer:
    """Serves the internal API on host:port for the life of an `async with` block."""

    def __init__(
        self, app: web.Application, host: str, port: int, *, reuse_port: bool = False
    ) -> None:
        self.reuse_port = reuse_port  # `--workers N`: N processes listen on this one port
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        self.host = host
        self.requested_port = port
        self.port = port  # the bound one once started (when 0 was asked)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> AdminServer:
        await self.runner.setup()
        try:
            site = web.TCPSite(
                self.runner, self.host, self.requested_port, reuse_port=self.reuse_port or None
            )
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        self.port = int(self.runner.addresses[0][1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.runner.cleanup()
