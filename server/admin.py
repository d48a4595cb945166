"""The internal HTTP API (PROTOCOL.md §3) for the platform's own services, on its own port.

Every request but /healthz and /metrics is signed: `X-Giftstream-Signature` is the hex
HMAC-SHA256 of the raw body (of the path, for GET) with the webhook secret. The signature is
checked before the body is even parsed, so a bad one changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from server.catalog import Catalog
from server.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from server.wallet import MoneyError, Wallet

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Giftstream-Signature"
MAX_BODY_BYTES = 64 * 1024
MAX_AMOUNT = 10**12
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_RECEIPT = re.compile(r"[A-Za-z0-9_.:-]{1,256}")  # store receipts are ids of many shapes
_PAYOUT_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
_UNSIGNED = frozenset({"/healthz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sign(secret: str, payload: bytes) -> str:
    """The signature a caller sends: hex HMAC-SHA256 of `payload` with the webhook secret."""
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class ApiError(Exception):
    """A 4xx answer: status, machine code and a message for the caller's logs."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(status, {"error": code, "message": message})


# ---- reading a request's body -------------------------------------------------------------


def _field_id(body: dict[str, Any], name: str, pattern: re.Pattern[str] = _ID) -> str:
    value = body.get(name)
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ApiError(400, "bad_request", f"`{name}` must be a string matching {pattern.pattern}")
    return value


def _field_amount(body: dict[str, Any], name: str, low: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= MAX_AMOUNT:
        raise ApiError(
            400, "bad_request", f"`{name}` must be an integer from {low} to {MAX_AMOUNT}"
        )
    return value


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    return body


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- the application ----------------------------------------------------------------------


def build_admin_app(
    *,
    wallet: Wallet,
    catalog: Catalog,
    redis: aioredis.Redis,
    webhook_secret: str,
    metrics: Metrics,
) -> web.Application:
    """The internal API, one handler per route; signing, limits and errors as middleware."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        try:
            if request.path not in _UNSIGNED and route is not None:
                await _check_signature(request, webhook_secret)
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc.status, exc.code, exc.message)
        except MoneyError as exc:
            response = _error(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself
            response = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or "")
        except Exception:
            log.exception("internal API %s %s failed", request.method, request.path)
            response = _error(500, "internal", "internal error")
        metrics.http_requests.labels(route=template, status=str(response.status)).inc()
        return response

    async def purchase(request: web.Request) -> web.Response:
        body = await _body(request)
        receipt = _field_id(body, "receipt", _RECEIPT)
        user = _field_id(body, "user")
        package_id = _field_id(body, "package")
        adult = body.get("adult", True)  # the payments backend has verified its buyers
        if not isinstance(adult, bool):
            raise ApiError(400, "bad_request", "`adult` must be true or false")
        package = catalog.packages.get(package_id)
        if package is None:
            raise ApiError(422, "unknown_package", f"no coin package {package_id}")
        result = await wallet.purchase(
            receipt=receipt, user=user, package=package, adult=adult, now_ms=_now_ms()
        )
        return _json(200, result.as_wire())

    async def refund(request: web.Request) -> web.Response:
        body = await _body(request)
        result = await wallet.refund(receipt=_field_id(body, "receipt", _RECEIPT), now_ms=_now_ms())
        return _json(200, result.as_wire())

    async def get_wallet(request: web.Request) -> web.Response:
        user = _path_user(request)
        return _json(200, (await wallet.wallet(user, _now_ms())).as_wire())

    async def put_limit(request: web.Request) -> web.Response:
        user = _path_user(request)
        body = await _body(request)
        if "daily_limit" not in body:
            raise ApiError(400, "bad_request", "`daily_limit` is required (an integer or null)")
        limit = None if body["daily_limit"] is None else _field_amount(body, "daily_limit", 0)
        view = await wallet.set_daily_limit(user, limit, now_ms=_now_ms())
        return _json(200, view.as_wire())

    async def payout(request: web.Request) -> web.Response:
        body = await _body(request)
        creator = _field_id(body, "creator")
        diamonds = _field_amount(body, "diamonds", 1)
        key = _field_id(body, "key", _PAYOUT_KEY)
        result = await wallet.payout(creator=creator, diamonds=diamonds, key=key, now_ms=_now_ms())
        return _json(200, result.as_wire())

    async def get_catalog(request: web.Request) -> web.Response:
        return _json(200, catalog.as_wire())

    async def healthz(request: web.Request) -> web.Response:
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            return _json(503, {"ok": False, "redis": "down", "message": str(exc)})
        return _json(200, {"ok": True, "redis": "up"})

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.render(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/purchases", purchase)
    app.router.add_post("/v1/refunds", refund)
    app.router.add_get("/v1/wallets/{user}", get_wallet)
    app.router.add_put("/v1/wallets/{user}/limit", put_limit)
    app.router.add_post("/v1/payouts", payout)
    app.router.add_get("/v1/catalog", get_catalog)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", get_metrics)
    return app


def _path_user(request: web.Request) -> str:
    user = request.match_info["user"]
    if _ID.fullmatch(user) is None:
        raise ApiError(400, "bad_request", "user id must be 1-64 characters of [A-Za-z0-9_.:-]")
    return user


async def _check_signature(request: web.Request, secret: str) -> None:
    """401 unless the signature matches: the body for writes, the raw path for GET."""
    given = request.headers.get(SIGNATURE_HEADER, "")
    if request.method == "GET":
        payload = request.raw_path.split("?", 1)[0].encode()
    else:
        payload = await request.read()  # aiohttp caps it at client_max_size (413)
    if not given or not hmac.compare_digest(given.lower().encode(), sign(secret, payload).encode()):
        raise ApiError(401, "bad_signature", f"missing or bad {SIGNATURE_HEADER}")


class AdminServer:
    """Serves the internal API on host:port for the life of an `async with` block."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        self.host = host
        self.requested_port = port
        self.port = port

    async def __aenter__(self) -> AdminServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.requested_port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])  # the bound port, when 0 was asked
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.runner.cleanup()
