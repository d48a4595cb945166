"""The README's screenshots of the viewer page and the ops dashboard (docs/img/*.png).

Run: `.venv/bin/python -m tests.web.screenshots` (after `make install-dev`). It starts
`giftstream serve --demo` on free ports in a temporary data dir, opens the page URLs the demo
block prints, goes live as cara (over the WebSocket, so no page meets her room before it is
made), sends gifts from a few clients and Ann's buttons, so the top 3 and the dashboard's
coins this session are real, and photographs both pages in Debian's Chromium. The one
refusal in the dashboard's table is the script's own, on purpose.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.processes import ServerProcess
from tests.web.conftest import chromium_path

OUT = Path(__file__).resolve().parent.parent.parent / "docs" / "img"
SENDERS = (("bob", "Bob"), ("dee", "Dee 🌸"), ("eve", "Eve"))


def page_urls(log: str) -> dict[str, str]:
    """The demo block's page URLs, by what they open."""
    found = re.findall(r"^\s+(viewer|creator|ops)\b.*?(http://\S+)$", log, re.MULTILINE)
    return dict(found)


async def gift(client: WsClient, gift_id: str, count: int, key: str) -> None:
    reply = await client.request(
        {"type": "gift", "room": "cara", "gift": gift_id, "count": count, "key": key}
    )
    assert reply["type"] == "gift_ok", reply


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", "--demo").start()
        try:
            await shoot(server)
        finally:
            server.stop()


async def shoot(server: ServerProcess) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while len(urls := page_urls("".join(server.log))) < 3:
        assert asyncio.get_running_loop().time() < deadline, "".join(server.log)
        await asyncio.sleep(0.1)
    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    tokens = TokenMaker(JWT_SECRET)
    async with (
        async_playwright() as playwright,
        AdminClient(f"http://127.0.0.1:{server.admin_port}", WEBHOOK_SECRET) as admin,
    ):
        browser = await playwright.chromium.launch(executable_path=chromium_path())
        phone = await browser.new_context(viewport={"width": 390, "height": 720})
        desk = await browser.new_context(viewport={"width": 1100, "height": 860})
        ops = await desk.new_page()
        await ops.goto(urls["ops"])
        # cara goes live before any page asks for her room: a page opened first would join a
        # room not yet made, and its `unknown_room` replies would show in the refusals table
        cara, _ = await WsClient.login(ws_url, tokens("cara", "creator", name="Cara"))
        live = await cara.request({"type": "go_live", "title": "Cooking night 🍳"})
        assert live["type"] == "live", live
        viewer = await phone.new_page()
        await viewer.goto(urls["viewer"])
        await expect(viewer.locator("#title")).to_have_text("Cooking night 🍳", timeout=10000)
        senders = []
        for user, name in SENDERS:
            await admin.buy(user, "coins_17500")
            client, _ = await WsClient.login(ws_url, tokens(user, name=name))
            await client.request({"type": "join", "room": "cara"})
            senders.append(client)
        bob, dee, eve = senders
        for i in range(12):  # a few seconds of traffic, so the chart has a shape
            await gift(bob, "heart", 1 + i % 3, f"shot-bob-{i:04d}")
            await gift(dee, "rose", 5, f"shot-dee-{i:04d}")
            if i % 4 == 0:
                await gift(eve, "doughnut", 2, f"shot-eve-{i:04d}")
            await viewer.locator('.gift-button[data-gift="ice_cream"]').click()
            await asyncio.sleep(0.7)
        await gift(eve, "whale", 1, "shot-eve-whale")
        await expect(viewer.locator(".fly.big")).to_have_count(1, timeout=5000)
        await asyncio.sleep(1.2)  # the whale mid-dive
        await snap(viewer, "viewer.png")
        refused = {"type": "gift", "room": "cara", "gift": "lion", "count": 1, "key": "shot-lion"}
        assert (await bob.request(refused))["code"] == "insufficient_coins"  # for the table
        await snap(ops, "ops.png", wait_for='#refusals tr[data-code="insufficient_coins"]')
        for client in (*senders, cara):
            await client.close()
        await browser.close()


async def snap(page: Page, name: str, wait_for: str | None = None) -> None:
    if wait_for is not None:
        await page.locator(wait_for).first.wait_for(timeout=10000)
    await page.screenshot(path=str(OUT / name))
    print(f"wrote {OUT / name}")


if __name__ == "__main__":
    asyncio.run(main())
