"""The one refusal type and its HTTP mapping, pure: no Redis, no server (the WebSocket's
mapping is tested beside it, tests/server/realtime/test_refusals.py)."""

from __future__ import annotations

from giftstream.server.money.admin import http_status
from giftstream.server.money.refusal import Reason, Refusal


def test_every_reason_has_an_http_status() -> None:
    """The middleware maps inside its `except`: a missing status would escape it."""
    for reason in Reason:
        assert 400 <= http_status(Refusal(reason, "no")) <= 599, reason


def test_a_bad_value_reads_bad_request_with_422() -> None:
    """The wallet's own value checks answered 422 `bad_request`; the API's form checks 400."""
    bad_value = Refusal(Reason.BAD_VALUE, "daily_limit must be ...")
    bad_form = Refusal(Reason.BAD_REQUEST, "body must be a JSON object")
    assert (http_status(bad_value), bad_value.code) == (422, "bad_request")
    assert (http_status(bad_form), bad_form.code) == (400, "bad_request")


def test_only_storage_trouble_is_worth_a_retry() -> None:
    assert [reason for reason in Reason if Refusal(reason, "").retryable] == [Reason.UNAVAILABLE]
