"""The internal API's OpenAPI document is true: it names exactly the router's routes, it is
served unsigned, and what the API answers conforms to it (the fuzzing is in
tests/security/test_api_fuzz.py)."""

from __future__ import annotations

import aiohttp
import redis.asyncio as aioredis
import schemathesis
from schemathesis.core.result import Ok

from giftstream.server.app import App
from giftstream.server.metrics import Metrics
from giftstream.server.money.admin import build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.openapi import OPENAPI_PATH, openapi_document
from giftstream.server.money.wallet import Wallet

HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options"}


def documented_routes() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    }


async def test_the_document_names_exactly_the_routes(
    redis_client: aioredis.Redis, wallet: Wallet, catalog: Catalog
) -> None:
    app = build_admin_app(
        wallet=wallet, catalog=catalog, redis=redis_client, webhook_secret="s", metrics=Metrics()
    )
    routed = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    assert documented_routes() == routed


def test_the_document_is_valid_openapi_3_1() -> None:
    """Checked against the OpenAPI 3.1 meta-schema (schemathesis's validate raises on a
    breach), and every operation in it can be built."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    assert openapi_document()["openapi"] == "3.1.0"
    schema.validate()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert {(op.method.upper(), op.path) for op in operations} == documented_routes()


def test_every_refusal_status_is_documented_with_the_error_body() -> None:
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            for status, reply in operation["responses"].items():
                if status.startswith("4"):
                    schema = reply["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)
                    assert method != "get" or status != "413", "a GET has no body to be too large"


async def test_the_document_is_served_unsigned(app: App) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(app.admin_url + OPENAPI_PATH) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == openapi_document()
