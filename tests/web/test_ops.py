"""The ops dashboard in a real Chromium against a real node over real sockets."""

from __future__ import annotations

from playwright.async_api import expect

from giftstream.server.app import App
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.web.conftest import OpenPage

SHOWN_MS = 10000  # stats lines come every 0.2 s on the test node; generous for a busy machine


async def test_the_dashboard_lists_a_new_room_and_its_chart_moves(
    app: App, tokens: TokenMaker, admin: AdminClient, open_page: OpenPage
) -> None:
    await admin.buy("ann", "coins_700")
    page = (await open_page(f"/ops#token={tokens('otto', 'ops')}")).page
    chart = page.locator("#chart")
    await expect(chart).not_to_have_attribute("data-points", "0", timeout=SHOWN_MS)
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "<b>Cooking</b> night"})
    row = page.locator('#live-rooms tr[data-room="cara"]')
    await expect(row).to_be_visible(timeout=SHOWN_MS)
    await expect(row.locator("td").nth(1)).to_have_text("<b>Cooking</b> night")
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann", name="Ann"))
    await viewer.request({"type": "join", "room": "cara"})
    await expect(row.locator("td").nth(2)).to_have_text("1", timeout=SHOWN_MS)
    points = int(await chart.get_attribute("data-points") or 0)
    await viewer.request(
        {"type": "gift", "room": "cara", "gift": "doughnut", "count": 2, "key": "ops-page-1"}
    )
    await expect(row.locator("td").nth(3)).to_have_text("60", timeout=SHOWN_MS)
    await expect(page.locator("#latest li").first).to_contain_text("Ann")
    await expect(page.locator("#top-rooms tr").first).to_contain_text("cara")
    # the chart moves: new points, and the gift shows as a rate above zero
    await expect(chart).not_to_have_attribute("data-max-gifts", "0", timeout=SHOWN_MS)
    assert int(await chart.get_attribute("data-points") or 0) > points
    await expect(page.locator("#connections")).to_have_text("3", timeout=SHOWN_MS)
    # a refusal is counted by its code
    await viewer.request(
        {"type": "gift", "room": "cara", "gift": "lion", "count": 1, "key": "ops-page-2"}
    )
    refusal = page.locator('#refusals tr[data-code="insufficient_coins"]')
    await expect(refusal.locator("td").nth(2)).to_have_text("1", timeout=SHOWN_MS)
    for client in (viewer, creator):
        await client.close()


async def test_the_dashboard_lists_rooms_live_before_it_opened(
    app: App, tokens: TokenMaker, open_page: OpenPage
) -> None:
    creator, _ = await WsClient.login(app.ws_url, tokens("dan", "creator"))
    await creator.request({"type": "go_live", "title": "Early"})
    page = (await open_page(f"/ops#token={tokens('otto', 'ops')}")).page
    await expect(page.locator('#live-rooms tr[data-room="dan"]')).to_be_visible(timeout=SHOWN_MS)
    await creator.request({"type": "end_live"})
    await expect(page.locator('#live-rooms tr[data-room="dan"]')).to_have_count(0, timeout=SHOWN_MS)
    await creator.close()


async def test_the_dashboard_shows_the_coins_of_the_session_before_it_opened(
    app: App, tokens: TokenMaker, admin: AdminClient, open_page: OpenPage
) -> None:
    """A room's coins this session come from the server (`watching.live[].coins`), so a
    dashboard opened late shows the gifts sent before it, then adds each later gift once;
    a reload shows the same figure (no gift counted twice)."""
    await admin.buy("ann", "coins_700")
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "Early gifts"})
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann", name="Ann"))
    await viewer.request({"type": "join", "room": "cara"})
    gift = {"type": "gift", "room": "cara", "gift": "doughnut", "count": 2, "key": "ops-early-1"}
    assert (await viewer.request(gift))["type"] == "gift_ok"
    opened = await open_page(f"/ops#token={tokens('otto', 'ops')}")
    page = opened.page
    await expect(page.locator("#live-rooms").locator("xpath=..")).to_contain_text(
        "coins this session"
    )
    row = page.locator('#live-rooms tr[data-room="cara"]')
    await expect(row).to_have_attribute("data-coins", "60", timeout=SHOWN_MS)
    await expect(row.locator("td").nth(3)).to_have_text("60")
    await viewer.request({**gift, "gift": "rose", "count": 1, "key": "ops-early-2"})
    await expect(row).to_have_attribute("data-coins", "61", timeout=SHOWN_MS)
    await expect(page.locator("#latest li").first).to_contain_text("Rose")
    await expect(page.locator("#top-rooms tr").first).to_contain_text("61")
    await page.reload()
    await expect(row).to_have_attribute("data-coins", "61", timeout=SHOWN_MS)
    # a new session starts at 0
    await creator.request({"type": "end_live"})
    await expect(row).to_have_count(0, timeout=SHOWN_MS)
    await creator.request({"type": "go_live", "title": "Again"})
    await expect(row).to_have_attribute("data-coins", "0", timeout=SHOWN_MS)
    assert opened.problems() == []
    for client in (viewer, creator):
        await client.close()
