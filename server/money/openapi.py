"""The internal API as an OpenAPI 3.1 document, served unsigned at GET /v1/openapi.json.

Written by hand beside the routes, not generated from them: it is the contract the platform's
services code against, so it says what each route takes and answers, every refusal included.
tests/server/money/test_openapi.py keeps it true: its routes are the router's routes, every
reply the API gives conforms to it, and schemathesis fuzzes the API from it.
"""

from __future__ import annotations

import copy
from typing import Any

from giftstream.protocol.rules import BOARDS, ID_CHARS, MAX_AMOUNT
from giftstream.protocol.signing import SIGNATURE_HEADER

__all__ = ["OPENAPI_PATH", "openapi_document"]

OPENAPI_PATH = "/v1/openapi.json"

Schema = dict[str, Any]

_ID = {"type": "string", "pattern": f"^[{ID_CHARS}]{{1,64}}$"}
_RECEIPT = {"type": "string", "pattern": f"^[{ID_CHARS}]{{8,128}}$"}
_KEY = {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$"}
_COUNT = {"type": "integer", "minimum": 0}


def _amount(low: int) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": MAX_AMOUNT}


def _limit() -> Schema:
    return {"oneOf": [_amount(0), {"type": "null"}]}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """A JSON object; unknown fields are allowed in requests (newer clients may add some)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: str) -> dict[str, Schema]:
    """The error replies a route can give, by status: always the same `{error, message}`."""
    described = {
        "400": "the body or a field is invalid (`bad_request`)",
        "401": "the signature is missing, malformed, stale or wrong (`bad_signature`)",
        "403": "refused for the user's age (`underage`)",
        "404": "no such receipt (`unknown_receipt`) or room (`unknown_room`)",
        "409": "refused by the stored state (the `error` code says which rule)",
        "413": "the body is over 64 KiB (`payload_too_large`)",
        "422": "refused by the catalog (`unknown_package`, `below_minimum`)",
        "429": "past the creator's payout cap for today (`payout_cap`): retry after 00:00 UTC",
        "503": "Redis is unavailable (`unavailable`): send the same request again",
    }
    return {code: _json(_ref("Error"), described[code]) for code in codes}


_WRITE_ERRORS = ("400", "401", "413", "503")
_READ_ERRORS = ("400", "401", "503")


def _operation(
    summary: str,
    ok: Schema,
    errors: tuple[str, ...],
    *,
    body: Schema | None = None,
    parameters: list[Schema] | None = None,
    signed: bool = True,
) -> Schema:
    operation: Schema = {
        "summary": summary,
        "responses": {"200": _json(ok, "done"), **_errors(*errors)},
    }
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    if parameters:
        operation["parameters"] = parameters
    if not signed:
        operation["security"] = []
    return operation


def _health(method: str) -> Schema:
    """Liveness with Redis reachable; HEAD too, for load balancers' probes (no body)."""
    replies = {"200": "Redis answered PING", "503": "Redis did not answer within 2 s"}
    if method == "head":
        responses = {status: {"description": text} for status, text in replies.items()}
    else:
        responses = {status: _json(_ref("Health"), text) for status, text in replies.items()}
    return {"summary": "Liveness with Redis reachable", "security": [], "responses": responses}


_USER_IN_PATH = {"name": "user", "in": "path", "required": True, "schema": _ID}

_SCHEMAS: dict[str, Schema] = {
    "Error": _object({"error": {"type": "string"}, "message": {"type": "string"}}),
    "Purchase": _object(
        {"receipt": _RECEIPT, "user": _ID, "package": _ID, "adult": {"type": "boolean"}},
        required=["receipt", "user", "package"],
    ),
    "Purchased": _object({"coins": _COUNT, "credited": {"type": "boolean"}}),
    "Refund": _object({"receipt": _RECEIPT}),
    "Refunded": _object(
        {
            "receipt": _RECEIPT,
            "user": _ID,
            "refunded": {"type": "boolean"},
            "coins_taken": _COUNT,
            "debt_added": _COUNT,
            "coins": _COUNT,
            "debt": _COUNT,
        }
    ),
    "Wallet": _object(
        {
            "user": _ID,
            "coins": _COUNT,
            "diamonds": _COUNT,
            "spent_today": _COUNT,
            "daily_limit": {"type": ["integer", "null"]},
            "debt": _COUNT,
            "spent_week": _COUNT,
            "weekly_limit": {"type": ["integer", "null"]},
            "diamonds_held": _COUNT,
            "diamonds_payable": _COUNT,
            "payout_left_today": _COUNT,
        }
    ),
    # Either limit or both: an absent one stays as it is, null clears it.
    "Limit": {
        **_object({"daily_limit": _limit(), "weekly_limit": _limit()}, required=[]),
        "minProperties": 1,
        "anyOf": [{"required": ["daily_limit"]}, {"required": ["weekly_limit"]}],
    },
    "Payout": _object({"creator": _ID, "diamonds": _amount(1), "key": _KEY}),
    "PaidOut": _object({"payout": {"type": "string"}, "cents": _COUNT, "diamonds": _COUNT}),
    "Catalog": _object(
        {
            "gifts": {
                "type": "array",
                "items": _object(
                    {
                        "id": _ID,
                        "name": {"type": "string"},
                        "coins": _COUNT,
                        "animation": {"type": "string"},
                    }
                ),
            },
            "packages": {
                "type": "array",
                "items": _object(
                    {
                        "id": _ID,
                        "coins": _COUNT,
                        "price_cents": _COUNT,
                        "currency": {"type": "string"},
                    }
                ),
            },
        }
    ),
    "Leaderboard": _object(
        {
            "board": {"enum": list(BOARDS)},
            "room": {"oneOf": [_ID, {"type": "null"}]},
            "entries": {
                "type": "array",
                "maxItems": 10,
                "items": _object(
                    {
                        "rank": {"type": "integer", "minimum": 1, "maximum": 10},
                        "user": _ID,
                        "name": {"type": "string"},
                        "coins": _COUNT,
                    }
                ),
            },
        }
    ),
    "Health": _object({"ok": {"type": "boolean"}, "redis": {"enum": ["up", "down"]}}),
}


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh dict each call, so a caller may not corrupt the next."""
    paths: dict[str, Schema] = {
        "/v1/purchases": {
            "post": _operation(
                "Credit a coin package, once per receipt",
                _ref("Purchased"),
                (*_WRITE_ERRORS, "403", "409", "422"),
                body=_ref("Purchase"),
            )
        },
        "/v1/refunds": {
            "post": _operation(
                "Reverse a purchase, once; what cannot be taken back becomes debt",
                _ref("Refunded"),
                (*_WRITE_ERRORS, "404"),
                body=_ref("Refund"),
            )
        },
        "/v1/wallets/{user}": {
            "get": _operation(
                "A user's coins, diamonds, spending and limits",
                _ref("Wallet"),
                _READ_ERRORS,
                parameters=[_USER_IN_PATH],
            )
        },
        "/v1/wallets/{user}/limit": {
            "put": _operation(
                "Set or clear the user's own spending cap",
                _ref("Wallet"),
                _WRITE_ERRORS,
                body=_ref("Limit"),
                parameters=[_USER_IN_PATH],
            )
        },
        "/v1/payouts": {
            "post": _operation(
                "Turn a creator's payable diamonds into a payout, once per key",
                _ref("PaidOut"),
                (*_WRITE_ERRORS, "409", "422", "429"),
                body=_ref("Payout"),
            )
        },
        "/v1/catalog": {
            "get": _operation("The gifts and the coin packages", _ref("Catalog"), _READ_ERRORS)
        },
        "/v1/leaderboards/{board}": {
            "get": _operation(
                "A leaderboard's top 10: session or week of a room, creators_day of none",
                _ref("Leaderboard"),
                (*_READ_ERRORS, "404"),
                parameters=[
                    {
                        "name": "board",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": list(BOARDS)},
                    },
                    {
                        "name": "room",
                        "in": "query",
                        "required": False,
                        "description": "the room (its creator's id): required by session and"
                        " week, refused by creators_day (400)",
                        "schema": _ID,
                    },
                ],
            )
        },
        OPENAPI_PATH: {"get": _operation("This document", {"type": "object"}, (), signed=False)},
        "/healthz": {method: _health(method) for method in ("get", "head")},
        "/metrics": {
            "get": {
                "summary": "Prometheus text format",
                "security": [],
                "responses": {
                    "200": {
                        "description": "every server metric",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "giftstream internal API",
                "version": "1",
                "description": (
                    "For the platform's own services. Every route but /healthz, /metrics and this"
                    " document is signed: see docs/api.md#signing."
                ),
            },
            "paths": paths,
            "components": {
                "schemas": _SCHEMAS,
                "securitySchemes": {
                    "signature": {
                        "type": "apiKey",
                        "in": "header",
                        "name": SIGNATURE_HEADER,
                        "description": (
                            "t=<unix seconds>,v1=<hex HMAC-SHA256 of t LF METHOD LF path LF body>"
                        ),
                    }
                },
            },
            "security": [{"signature": []}],
        }
    )
