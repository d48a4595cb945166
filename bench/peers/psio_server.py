"""Peer 3: a python-socketio server on aiohttp with giftstream's room and batching policy: a
socket enters the room; gifts are collected for a 20 ms tick, then ONE `sio.emit(..., room=)`
per tick carries the array of the room's events. Runs from its own venv (bench/.peers/psio)."""

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import socketio
import uvloop
from aiohttp import web

TICK_S = 0.02
GIFTS = {
    "rose": {"id": "rose", "name": "Rose", "coins": 1, "animation": "anim.rose.v1"},
    "heart": {"id": "heart", "name": "Heart", "coins": 5, "animation": "anim.heart.v1"},
}
sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"])
app = web.Application()
sio.attach(app)
rooms: dict[str, dict[str, Any]] = {}  # room id -> {"seq": int, "outbox": list}
event_ids = itertools.count(1)


@sio.on("join")
async def join(sid: str, msg: dict[str, Any]) -> None:
    room = rooms.setdefault(msg["room"], {"seq": 0, "outbox": []})
    await sio.save_session(sid, {"user": msg.get("user", "anon")})
    await sio.enter_room(sid, msg["room"])
    await sio.emit("joined", {"room": msg["room"], "seq": room["seq"]}, to=sid)


@sio.on("gift")
async def gift(sid: str, msg: dict[str, Any]) -> None:
    room = rooms.get(msg["room"])
    if room is None or msg["room"] not in sio.rooms(sid):
        return
    user = (await sio.get_session(sid))["user"]
    room["seq"] += 1
    event = {
        "type": "gift",
        "room": msg["room"],
        "seq": room["seq"],
        "event": f"e{os.getpid()}-{next(event_ids)}",
        "sender": {"id": user, "name": user},
        "gift": GIFTS.get(str(msg.get("gift")), GIFTS["rose"]),
        "count": msg.get("count", 1),
        "combo": 1,
        "ts": int(time.time() * 1000),
        "sent": msg.get("sent"),
    }
    room["outbox"].append(event)
    await sio.emit("gift_ok", {"key": msg.get("key"), "event": event["event"]}, to=sid)


async def ticker(app: web.Application) -> AsyncIterator[None]:
    async def tick() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for room_id, room in rooms.items():
                if room["outbox"]:
                    events, room["outbox"] = room["outbox"], []
                    await sio.emit("gifts", events, room=room_id)

    task = asyncio.create_task(tick())
    yield
    task.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9002)
    args = parser.parse_args()
    app.cleanup_ctx.append(ticker)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
