"""The viewer page in a real Chromium against a real node over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import WebSocket, expect

from giftstream.server.app import App
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.web.conftest import OpenPage

# Generous deadlines (a shared machine); a gift shows in well under a second when idle.
SHOWN_MS = 5000
EVIL_NAME = "<img src=x onerror=alert(1)>"
TIMES = "\u00d7"  # the multiplication sign the page writes before a count


@pytest.fixture
async def cara(app: App, tokens: TokenMaker) -> AsyncIterator[WsClient]:
    """Cara's room, live."""
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator", name="Cara"))
    await creator.request({"type": "go_live", "title": "Cooking night"})
    yield creator
    await creator.close()


async def sender(app: App, tokens: TokenMaker, user: str, name: str) -> WsClient:
    client, _ = await WsClient.login(app.ws_url, tokens(user, name=name))
    assert (await client.request({"type": "join", "room": "cara"}))["type"] == "joined"
    return client


async def test_shows_a_gift_sent_by_another_client(
    app: App, tokens: TokenMaker, admin: AdminClient, cara: WsClient, open_page: OpenPage
) -> None:
    await admin.buy("bob", "coins_700")
    viewer = await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")
    page = viewer.page
    await expect(page.locator("#title")).to_have_text("Cooking night", timeout=SHOWN_MS)
    await expect(page.locator(".gift-button")).to_have_count(len(app.catalog.gifts))
    bob = await sender(app, tokens, "bob", "Bob")
    await expect(page.locator("#viewers")).to_have_text("2", timeout=SHOWN_MS)
    ok = await bob.request(
        {"type": "gift", "room": "cara", "gift": "heart", "count": 3, "key": "bob-heart-1"}
    )
    assert ok["type"] == "gift_ok"
    card = page.locator('.combo[data-sender="bob"]')
    await expect(card).to_be_visible(timeout=SHOWN_MS)
    await expect(card.locator(".sender")).to_have_text("Bob")
    await expect(card.locator(".count")).to_have_text(f"{TIMES}3")
    await expect(page.locator(".fly.small")).to_have_count(1, timeout=SHOWN_MS)
    # the same gift again within 5 s: the combo counts up to 2
    await bob.request(
        {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "bob-heart-2"}
    )
    await expect(card.locator(".streak")).to_have_text("combo 2", timeout=SHOWN_MS)
    await bob.close()


async def test_a_gift_button_sends_the_gift_and_the_balance_drops(
    app: App, tokens: TokenMaker, admin: AdminClient, cara: WsClient, open_page: OpenPage
) -> None:
    await admin.buy("ann", "coins_700")
    page = (await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")).page
    await expect(page.locator("#balance")).to_have_text("700", timeout=SHOWN_MS)
    await expect(page.locator("#title")).to_have_text("Cooking night", timeout=SHOWN_MS)
    await page.locator('.gift-button[data-gift="heart"]').click()
    await expect(page.locator("#balance")).to_have_text("695", timeout=SHOWN_MS)
    await expect(page.locator('.combo[data-sender="ann"] .sender')).to_have_text("Ann")
    # a big gift plays full stage
    await admin.buy("ann", "coins_7000")
    await page.locator('.gift-button[data-gift="sports_car"]').click()
    await expect(page.locator(".fly.big.m-drive")).to_have_count(1, timeout=SHOWN_MS)
    await expect(page.locator("#balance")).to_have_text("695", timeout=SHOWN_MS)
    coins, _ = await app.wallet.balance("ann")
    assert coins == 695


async def test_a_refused_gift_says_why(
    tokens: TokenMaker, cara: WsClient, open_page: OpenPage
) -> None:
    page = (await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")).page
    await expect(page.locator("#balance")).to_have_text("0", timeout=SHOWN_MS)
    await expect(page.locator("#title")).to_have_text("Cooking night", timeout=SHOWN_MS)
    await page.locator('.gift-button[data-gift="lion"]').click()
    notice = page.locator("#notice")
    await expect(notice).to_have_text("Not enough coins for that gift.", timeout=SHOWN_MS)
    await expect(notice).to_have_class("notice error")


async def test_a_sender_name_made_of_markup_shows_as_text(
    app: App, tokens: TokenMaker, admin: AdminClient, cara: WsClient, open_page: OpenPage
) -> None:
    await admin.buy("mallory", "coins_700")
    page = (await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")).page
    await expect(page.locator("#title")).to_have_text("Cooking night", timeout=SHOWN_MS)
    mallory = await sender(app, tokens, "mallory", EVIL_NAME)
    # a mid-size gift: its caption on the stage shows the name too
    await mallory.request(
        {"type": "gift", "room": "cara", "gift": "confetti", "count": 1, "key": "mallory-001"}
    )
    name = page.locator('.combo[data-sender="mallory"] .sender')
    await expect(name).to_have_text(EVIL_NAME, timeout=SHOWN_MS)
    await expect(page.locator(".fly.mid .caption b")).to_have_text(EVIL_NAME)
    assert await page.locator("img").count() == 0
    await mallory.close()


async def test_recovers_with_since_after_a_drop(
    app: App, tokens: TokenMaker, admin: AdminClient, cara: WsClient, open_page: OpenPage
) -> None:
    await admin.buy("bob", "coins_700")
    viewer = await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")
    page = viewer.page
    sent: list[str] = []

    def on_socket(socket: WebSocket) -> None:
        socket.on("framesent", lambda payload: sent.append(str(payload)))

    page.on("websocket", on_socket)
    await expect(page.locator("#title")).to_have_text("Cooking night", timeout=SHOWN_MS)
    bob = await sender(app, tokens, "bob", "Bob")
    await bob.request(
        {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": "bob-rose-1"}
    )
    await expect(page.locator('.combo[data-sender="bob"]')).to_be_visible(timeout=SHOWN_MS)
    # the network drops: the page reconnects and joins with the last seq it handled
    await page.evaluate("client.ws.close()")
    await bob.request(
        {"type": "gift", "room": "cara", "gift": "doughnut", "count": 2, "key": "bob-dough-1"}
    )
    await expect(page.locator("#state")).to_have_text("live", timeout=SHOWN_MS)
    await expect(page.locator('.combo[data-sender="bob"] .count').first).to_have_text(
        f"{TIMES}2", timeout=SHOWN_MS
    )
    assert any('"since"' in frame for frame in sent), sent
    await bob.close()


async def test_without_a_room_the_page_asks_for_one(open_page: OpenPage) -> None:
    page = (await open_page("/")).page
    await expect(page.locator("#pick")).to_be_visible()
    await expect(page.locator("#live")).to_be_hidden()


async def test_a_creator_goes_live_from_the_page_and_a_waiting_viewer_joins(
    tokens: TokenMaker, open_page: OpenPage
) -> None:
    viewer = (await open_page(f"/?room=cara#token={tokens('ann', name='Ann')}")).page
    await expect(viewer.locator("#notice")).to_have_text("This room is not live yet.")
    creator = (await open_page(f"/?room=cara#token={tokens('cara', 'creator')}")).page
    await creator.locator("#go-live-title").fill("Made on the page")
    await creator.locator("#go-live button").click()
    await expect(creator.locator("#title")).to_have_text("Made on the page", timeout=SHOWN_MS)
    await expect(viewer.locator("#title")).to_have_text("Made on the page", timeout=SHOWN_MS)
    await expect(viewer.locator("#viewers")).to_have_text("2", timeout=SHOWN_MS)
