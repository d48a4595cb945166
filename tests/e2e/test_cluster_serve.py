"""`giftstream serve` on a Redis Cluster, given the URL of any one node: two gateway
processes are one service there as on one Redis (PROTOCOL.md §6). A room opened on one
gateway is joined on both; its events reach every viewer in seq order, a viewer that moves
gateway recovers with `since`, and viewer counts are summed over the gateways. Two rooms in
different partitions (so different slots) are followed by one gateway at once. A start that
asks another partition count than the data's is refused in one line."""

from __future__ import annotations

import asyncio
import functools
import itertools
import urllib.request
from pathlib import Path

import orjson
from redis.cluster import RedisCluster as SyncRedisCluster

from giftstream.server.money import keys
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.e2e.gateways import Member, gateway, gateway_args, start, stop_all
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient
from tests.processes import ServerProcess, run_cli

ROOMS = ("cara", "dan")  # a room id is its creator's id: these sit in different partitions
SPACE = keys.KeySpace(partitions=keys.DEFAULT_PARTITIONS, cluster=True)
DEADLINE_S = 30.0  # generous: a loaded 2-core machine runs a cluster and two gateways


async def go_live(url: str, tokens: TokenMaker, creator: str) -> WsClient:
    client, _ = await WsClient.login(url, tokens(creator, "creator"))
    live = await client.request({"type": "go_live", "title": f"{creator} live"}, timeout=20)
    assert live["type"] == "live", live
    return client


def cluster_ledger_gifts(url: str, room: str) -> list[dict[str, object]]:
    """Every gift entry of `room` in every partition's ledger."""
    client = SyncRedisCluster.from_url(url)
    try:
        found = []
        for ledger in SPACE.ledgers():
            for _, fields in client.xrange(ledger) or []:
                assert fields is not None
                data = orjson.loads(fields[b"data"])
                if data["kind"] == "gift" and data["room"] == room:
                    found.append(data)
        return found
    finally:
        client.close()


async def test_two_gateways_on_a_cluster_serve_rooms_across_them(
    cluster_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    assert SPACE.partition(ROOMS[0]) != SPACE.partition(ROOMS[1])
    a, b = gateway(tmp_path, "a", cluster_url), gateway(tmp_path, "b", cluster_url)
    clients: list[WsClient] = []
    members: list[Member] = []
    try:
        await start(a, b)
        for proc in (a, b):
            ready = [line for line in proc.log if "giftstream ready" in line]
            assert ready and "Redis Cluster, 16 partitions" in ready[0], proc.log
        for room in ROOMS:  # both rooms open on a
            clients.append(await go_live(a.ws_url, tokens, room))

        # One viewer of each room on each gateway: b follows both rooms (two partitions).
        first = {
            room: [Member(f"{room}-{g}", tokens(f"{room}-{g}"), room) for g in "ab"]
            for room in ROOMS
        }
        for room in ROOMS:
            on_a, on_b = first[room]
            await on_a.join(a.ws_url, "a")
            await on_b.join(b.ws_url, "b")
            members += [on_a, on_b]
        for member in members:
            await member.wait_for_viewers(2, timeout=DEADLINE_S)

        # A third viewer of cara on b: the count, summed over the gateways, reaches all.
        cara_a, cara_b = first["cara"]
        third = Member("cara-c", tokens("cara-c"), "cara")
        await third.join(b.ws_url, "b")
        members.append(third)
        for member in (cara_a, cara_b, third):
            await member.wait_for_viewers(3, timeout=DEADLINE_S)

        # cara's viewer on a drops; the count changes while it is away; it comes back on b
        # with `since` and recovers what it missed, with no hole in the room's seqs.
        await cara_a.close()
        for member in (cara_b, third):
            await member.wait_for_viewers(2, timeout=DEADLINE_S)
        joined = await cara_a.join(b.ws_url, "b")
        assert joined["recovered"] is True
        for member in (cara_a, cara_b, third):
            await member.wait_for_viewers(3, timeout=DEADLINE_S)

        # Each creator ends their room from a: every viewer on both gateways gets room_ended.
        for client in clients:
            assert (await client.request({"type": "end_live"}, timeout=20))["type"] == "ended"
        for member in members:
            assert member.client is not None
            await member.client.wait_for_room_events(1, timeout=DEADLINE_S, kind="room_ended")
        for member in members:
            assert member.seq_hole() is None, member.seq_hole()
            assert member.events()[-1]["type"] == "room_ended", member.events()[-1]
        for proc in (a, b):  # the tick loops log and go on: none may have failed meanwhile
            assert not any("Traceback" in line for line in proc.log), "".join(proc.log)
    finally:
        for member in members:
            await member.close()
        for client in clients:
            await client.close()
        stop_all([a, b])


async def test_workers_serve_a_cluster(
    cluster_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    """`serve --workers 2`: every worker process builds its own cluster client and takes
    part; a room opened through the shared port is joined through it."""
    server = gateway(tmp_path, "workers", cluster_url)
    server.args += ["--workers", "2"]
    clients: list[WsClient] = []
    try:
        await asyncio.to_thread(server.start, 60)
        clients.append(await go_live(server.ws_url, tokens, "cara"))
        viewer, _ = await WsClient.login(server.ws_url, tokens("vw"))
        clients.append(viewer)
        joined = await viewer.request({"type": "join", "room": "cara"}, timeout=20)
        assert joined["type"] == "joined" and joined["creator"] == "cara", joined
    finally:
        for client in clients:
            await client.close()
        stop_all([server])


async def test_gifts_on_a_cluster_reach_both_gateways_once(
    cluster_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    a, b = gateway(tmp_path, "a", cluster_url), gateway(tmp_path, "b", cluster_url)
    clients: list[WsClient] = []
    members: list[Member] = []
    try:
        await start(a, b)
        clients.append(await go_live(a.ws_url, tokens, "cara"))
        async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
            for sender in ("sa", "sb"):
                await admin.buy(sender, "coins_700")
        senders = {g: Member(f"s{g}", tokens(f"s{g}"), "cara") for g in "ab"}
        viewers = {g: Member(f"v{g}", tokens(f"v{g}"), "cara") for g in "ab"}
        for g, proc in (("a", a), ("b", b)):
            for member in (senders[g], viewers[g]):
                await member.join(proc.ws_url, g)
                members.append(member)
        acked = [
            (await senders[g].gift(f"cluster-{g}-{n:04d}"))["event"] for g in "ab" for n in range(3)
        ]
        for member in members:
            await member.wait_for_gifts(set(acked), timeout=DEADLINE_S)
        ledger = {str(g["event"]) for g in cluster_ledger_gifts(cluster_url, "cara")}
        assert ledger == set(acked)
        for member in members:
            assert member.gift_events() == dict.fromkeys(acked, 1), member.user
            assert member.seq_hole() is None, member.seq_hole()
        # the boards, counted by credit.lua on the room's shard: 3 hearts (15 coins) each,
        # ties by id; one `leaders` event per change, the same on both gateways
        top = [("sa", 15), ("sb", 15)]

        def leaders_of(member: Member) -> list[Frame]:
            return [e for e in member.events() if e["type"] == "leaders"]

        def final(member: Member) -> bool | None:
            events = leaders_of(member)
            if not events:
                return None
            return [(e["user"], e["coins"]) for e in events[-1]["top"]] == top or None

        for viewer in viewers.values():
            assert viewer.client is not None
            await viewer.client.wait_until(functools.partial(final, viewer), DEADLINE_S, "leaders")
        assert leaders_of(viewers["a"]) == leaders_of(viewers["b"])
        tops = [e["top"] for e in leaders_of(viewers["a"])]
        assert all(x != y for x, y in itertools.pairwise(tops)), tops
        async with AdminClient(b.admin_url, WEBHOOK_SECRET) as admin:
            status, board = await admin.call("GET", "/v1/leaderboards/session?room=cara")
        assert status == 200
        assert [(e["rank"], e["user"], e["coins"]) for e in board["entries"]] == [
            (1, "sa", 15),
            (2, "sb", 15),
        ]
    finally:
        for member in members:
            await member.close()
        for client in clients:
            await client.close()
        stop_all([a, b])


async def test_a_start_asking_other_partitions_is_refused_in_one_line(
    cluster_url: str, tmp_path: Path
) -> None:
    first = gateway(tmp_path, "first", cluster_url)  # fixes the default partition count
    await start(first)
    stop_all([first])
    done = await asyncio.to_thread(
        run_cli,
        "serve",
        "--redis-url",
        cluster_url,
        "--partitions",
        "4",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--data-dir",
        str(tmp_path / "second"),
        "--jwt-secret",
        JWT_SECRET,
        "--webhook-secret",
        WEBHOOK_SECRET,
        timeout=120,
    )
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if "partitions" in line]
    assert len(refusals) == 1, done.stderr
    assert "has 16 partitions" in refusals[0] and "--partitions 16" in refusals[0]
    assert "Traceback" not in done.stderr, done.stderr


def credits_applied(proc: ServerProcess) -> float:
    """The server's `giftstream_credits_applied_total` from its /metrics."""
    with urllib.request.urlopen(f"{proc.admin_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = [line for line in text.splitlines() if line.startswith("giftstream_credits_applied")]
    return sum(float(line.split()[-1]) for line in found if "_created" not in line)


async def test_a_server_with_crediting_off_leaves_its_gifts_to_the_others_runners(
    cluster_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    """`--crediting off` (a large service runs the runner on a few servers): gifts sent on
    that server are credited by another server's runner, exactly once, and it credits none."""
    quiet = ServerProcess(tmp_path / "quiet", *gateway_args(cluster_url), "--crediting", "off")
    busy = gateway(tmp_path, "busy", cluster_url)
    clients: list[WsClient] = []
    members: list[Member] = []
    try:
        await start(quiet, busy)
        clients.append(await go_live(quiet.ws_url, tokens, "cara"))
        async with AdminClient(quiet.admin_url, WEBHOOK_SECRET) as admin:
            await admin.buy("sq", "coins_700")
            sender = Member("sq", tokens("sq"), "cara")
            members.append(sender)
            await sender.join(quiet.ws_url, "quiet")
            for n in range(3):
                await sender.gift(f"quiet-gift-{n:04d}")
            deadline = asyncio.get_running_loop().time() + DEADLINE_S
            gifts = cluster_ledger_gifts(cluster_url, "cara")
            diamonds = sum(int(str(g["diamonds"])) for g in gifts)
            while (await admin.call("GET", "/v1/wallets/cara"))[1]["diamonds"] != diamonds:
                assert asyncio.get_running_loop().time() < deadline, "never credited"
                await asyncio.sleep(0.05)
        assert len(gifts) == 3
        assert await asyncio.to_thread(credits_applied, quiet) == 0
        assert await asyncio.to_thread(credits_applied, busy) == 3
    finally:
        for member in members:
            await member.close()
        for client in clients:
            await client.close()
        stop_all([quiet, busy])
