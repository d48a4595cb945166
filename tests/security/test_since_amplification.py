"""Small requests cannot make the server hold unbounded output (PROTOCOL.md §2.5 r2): joins
with `since: 0` from clients that never read cost at most the backlog bound per connection,
and such connections are let go within the close timeout even though they never read the
close."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.uri import parse_uri

from giftstream.server.app import App
from giftstream.server.config import Limits
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.processes import ServerProcess

HISTORY_EVENTS = 1000
ATTACKERS = 20
JOINS_EACH = 60
BOUND = Limits().max_backlog_bytes  # the server runs with the default bound
SEND_BUFFER = 2 * Limits().send_buffer_bytes  # the kernel's share (Linux doubles SO_SNDBUF)
MARGIN = 32 << 20  # interpreter, allocator slack, 20 connections' websockets state
TINY_RCVBUF = 4096


def rss_bytes(pid: int) -> int:
    """The process's resident set, from /proc/<pid>/status (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def sockets_on_port(pid: int, port: int) -> tuple[int, int]:
    """How many of the process's open sockets are TCP connections on local `port`, and the
    bytes the kernel holds unsent for them (their send queues)."""
    queued: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A":  # 0A: the listening socket
                queued[fields[9]] = int(fields[4].split(":")[0], 16)
    held = unsent = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = target[8:-1] if target.startswith("socket:[") else ""
        if inode in queued:
            held += 1
            unsent += queued[inode]
    return held, unsent


async def metric(http: aiohttp.ClientSession, admin_url: str, name: str) -> float:
    async with http.get(admin_url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


class SilentClient:
    """A raw WebSocket client with a tiny receive buffer that reads its welcome and then
    never reads again: what the server writes to it stays on the server's side."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.protocol = ClientProtocol(parse_uri(url))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RCVBUF)
        self.sock.setblocking(False)

    async def open(self, token: str) -> None:
        loop = asyncio.get_running_loop()
        uri = parse_uri(self.url)
        await loop.sock_connect(self.sock, (uri.host, uri.port))
        self.protocol.send_request(self.protocol.connect())
        await self._flush()
        await self._read_until(lambda e: isinstance(e, Response))
        self.send({"type": "hello", "token": token})
        await self._flush()
        await self._read_until(lambda e: b'"welcome"' in getattr(e, "data", b""))

    def send(self, message: dict[str, object]) -> None:
        self.protocol.send_text(orjson.dumps(message))

    async def _flush(self) -> None:
        """Everything pending in one write: the server reads the requests in one go."""
        data = b"".join(self.protocol.data_to_send())
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _read_until(self, found: Callable[[object], bool]) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(20):
            while True:
                data = await loop.sock_recv(self.sock, 65536)
                assert data, "server closed during the handshake"
                self.protocol.receive_data(data)
                if any(found(event) for event in self.protocol.events_received()):
                    return

    async def send_all(self, messages: list[dict[str, object]]) -> None:
        for message in messages:
            self.send(message)
        await self._flush()

    def close(self) -> None:
        self.sock.close()


async def fill_history(ws_url: str, admin_url: str, tokens: TokenMaker) -> None:
    """A live room `cara` with `HISTORY_EVENTS` gifts in its history."""
    async with AdminClient(admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_7000")
    creator, _ = await WsClient.login(ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "big history"})
    sender, _ = await WsClient.login(ws_url, tokens("ann"))
    await sender.request({"type": "join", "room": "cara"})
    for start in range(0, HISTORY_EVENTS, 100):
        replies = await asyncio.gather(
            *(
                sender.request(
                    {
                        "type": "gift",
                        "room": "cara",
                        "gift": "rose",
                        "count": 1,
                        "key": f"key-{n:06d}",
                    },
                    timeout=30,
                )
                for n in range(start, start + 100)
            )
        )
        assert {r["type"] for r in replies} == {"gift_ok"}, replies
    await sender.wait_for_room_events(HISTORY_EVENTS, timeout=30, kind="gift")
    await sender.close()
    await creator.close()


async def test_since_replays_to_silent_clients_stay_within_the_bound(
    redis_url: str, data_dir: Path
) -> None:
    rate = "5000"  # the history is filled by one sender, fast
    server = ServerProcess(
        data_dir,
        "--redis-url",
        redis_url,
        "--gifts-per-s",
        rate,
        "--user-gifts-per-s",
        rate,
        "--messages-per-s",
        rate,
    ).start()
    assert server.proc is not None
    pid = server.proc.pid
    tokens = TokenMaker(JWT_SECRET)
    attackers: list[SilentClient] = []
    try:
        await fill_history(server.ws_url, server.admin_url, tokens)
        async with aiohttp.ClientSession() as http:
            baseline = rss_bytes(pid)
            for n in range(ATTACKERS):
                client = SilentClient(server.ws_url)
                await client.open(tokens(f"eve{n}"))
                attackers.append(client)
            joins = [
                {"type": "join", "room": "cara", "since": 0, "id": i} for i in range(JOINS_EACH)
            ]
            await asyncio.gather(*(client.send_all(joins) for client in attackers))
            # sample what the server holds (its memory, plus the kernel's send queues of its
            # sockets) until it has let go of every attacker, who still hold their sockets
            # open and never read: at most the close timeout and a margin
            peak = 0
            deadline = time.monotonic() + Limits().close_timeout_s + 30
            while True:
                held, unsent = sockets_on_port(pid, server.port)
                peak = max(peak, rss_bytes(pid) - baseline + unsent)
                if not held:
                    break
                assert time.monotonic() < deadline, "the server still holds silent clients"
                await asyncio.sleep(0.05)
            budget = ATTACKERS * (BOUND + SEND_BUFFER) + MARGIN
            assert peak < budget, f"held {peak >> 20} MiB, over {budget >> 20} MiB"
            assert await metric(http, server.admin_url, "giftstream_connections") == 0
    finally:
        for client in attackers:
            client.close()
        if server.running:
            server.stop()


async def test_a_replay_past_the_bound_is_not_written_but_closed_4008(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    lifted = {"gifts_burst": 1000, "user_gifts_burst": 1000, "messages_burst": 1000}
    async with make_app(max_backlog_bytes=16 * 1024, **lifted) as node:
        async with AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
            await admin.buy("ann", "coins_700")
        creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
        await creator.request({"type": "go_live", "title": "t"})
        sender, _ = await WsClient.login(node.ws_url, tokens("ann"))
        await sender.request({"type": "join", "room": "cara"})
        for n in range(100):  # ~25 KiB of history: more than the 16 KiB bound
            ok = await sender.request(
                {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": f"key-{n:06d}"}
            )
            assert ok["type"] == "gift_ok"
        # every gift is out to the room before bob joins: none reaches him live
        await sender.wait_for_room_events(100, timeout=30, kind="gift")
        late, _ = await WsClient.login(node.ws_url, tokens("bob"))
        # a plain join is answered; the one whose replay cannot fit closes the socket unanswered
        assert (await late.request({"type": "join", "room": "cara"}))["type"] == "joined"
        await late.send({"type": "join", "room": "cara", "since": 0, "id": "replay"})
        assert await late.closed_with(timeout=15) == 4008
        assert not [f for f in late.unread if f.get("id") == "replay"]
        assert not [e for e in late.room_events if e["type"] == "gift"]
        for client in (sender, creator):
            await client.close()


async def test_since_joins_past_the_budget_are_rate_limited(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with make_app(replays_per_s=0.01, replays_burst=2) as node:
        creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
        await creator.request({"type": "go_live", "title": "t"})
        viewer, _ = await WsClient.login(node.ws_url, tokens("bob"))
        for _ in range(2):
            joined = await viewer.request({"type": "join", "room": "cara", "since": 0})
            assert joined["type"] == "joined"
        refused = await viewer.request({"type": "join", "room": "cara", "since": 0})
        assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
        # a join without `since` costs no replay and is still served
        assert (await viewer.request({"type": "join", "room": "cara"}))["type"] == "joined"
        for client in (viewer, creator):
            await client.close()
