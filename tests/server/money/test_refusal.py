"""The one refusal type and its two mappings, pure: no Redis, no server."""

from __future__ import annotations

import pytest

from giftstream.protocol.errors import ErrorCode
from giftstream.server.money.admin import http_status
from giftstream.server.money.refusal import Reason, Refusal, protocol_error


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


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.BAD_REQUEST, ErrorCode.BAD_REQUEST),
        (Reason.BAD_COUNT, ErrorCode.BAD_COUNT),
        (Reason.KEY_REUSED, ErrorCode.KEY_REUSED),
        (Reason.DEBT, ErrorCode.INSUFFICIENT_COINS),
        (Reason.UNDERAGE, ErrorCode.UNDERAGE),
        (Reason.SPENDING_LIMIT, ErrorCode.SPENDING_LIMIT),
        (Reason.INSUFFICIENT_COINS, ErrorCode.INSUFFICIENT_COINS),
    ],
)
def test_the_gift_path_refusals_as_websocket_errors(reason: Reason, code: ErrorCode) -> None:
    error = protocol_error(Refusal(reason, "the script's words"), request_id=7)
    assert (error.code, error.message, error.request_id) == (code, "the script's words", 7)


def test_only_storage_trouble_is_worth_a_retry() -> None:
    assert [reason for reason in Reason if Refusal(reason, "").retryable] == [Reason.UNAVAILABLE]
