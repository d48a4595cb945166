"""The money layer's refusals as the WebSocket answers them: the mapping, pure, and a gift
refused for debt over a real socket."""

from __future__ import annotations

import pytest

from giftstream.protocol.errors import ErrorCode
from giftstream.server.app import App
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.realtime.refusals import protocol_error
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.server.test_metrics import sample, scrape

GIFT_PATH = {
    Reason.BAD_REQUEST: ErrorCode.BAD_REQUEST,
    Reason.BAD_COUNT: ErrorCode.BAD_COUNT,
    Reason.KEY_REUSED: ErrorCode.KEY_REUSED,
    Reason.DEBT: ErrorCode.INSUFFICIENT_COINS,
    Reason.UNDERAGE: ErrorCode.UNDERAGE,
    Reason.SPENDING_LIMIT: ErrorCode.SPENDING_LIMIT,
    Reason.INSUFFICIENT_COINS: ErrorCode.INSUFFICIENT_COINS,
    Reason.ROOM_NOT_LIVE: ErrorCode.ROOM_NOT_LIVE,
    Reason.UNKNOWN_ROOM: ErrorCode.UNKNOWN_ROOM,  # the leaderboard request's
}


@pytest.mark.parametrize(("reason", "code"), list(GIFT_PATH.items()))
def test_the_gift_path_refusals_as_websocket_errors(reason: Reason, code: ErrorCode) -> None:
    error = protocol_error(Refusal(reason, "the script's words"), request_id=7)
    assert error is not None
    assert (error.code, error.message, error.request_id) == (code, "the script's words", 7)


@pytest.mark.parametrize("reason", [reason for reason in Reason if reason not in GIFT_PATH])
def test_a_refusal_no_websocket_request_can_cause_is_not_mapped(reason: Reason) -> None:
    """The session logs it and answers `internal`, as any bug."""
    assert protocol_error(Refusal(reason, "no"), request_id=7) is None


async def test_a_gift_refused_for_debt_reads_insufficient_coins_saying_you_owe(
    app: App, tokens: TokenMaker, admin: AdminClient
) -> None:
    await admin.buy("eve", "coins_70", receipt="receipt-eve-1")
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "Show"})
    eve, _ = await WsClient.login(app.ws_url, tokens("eve"))
    await eve.request({"type": "join", "room": "cara"})
    gift = {"type": "gift", "room": "cara", "gift": "doughnut", "count": 2, "key": "eve-spends"}
    assert (await eve.request(gift))["type"] == "gift_ok"
    status, _ = await admin.call("POST", "/v1/refunds", {"receipt": "receipt-eve-1"})
    assert status == 200  # 10 coins taken back, 60 owed
    refused = await eve.request({**gift, "gift": "rose", "count": 1, "key": "eve-in-debt"})
    assert refused == {
        "type": "error",
        "code": "insufficient_coins",
        "message": "you owe 60 coins from a refunded purchase; "
        "buy coins to settle it before gifting",
        "retryable": False,
    }
    assert sample(await scrape(app), "giftstream_errors_total", '{code="insufficient_coins"}') == 1
    for client in (eve, creator):
        await client.close()
