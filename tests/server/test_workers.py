"""`giftstream serve --workers N`: N real server processes on one port under a supervisor
that shares one embedded Redis, restarts a worker killed -9 and drains all on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
from websockets.asyncio.client import connect

from giftstream.server.embedded_redis import EmbeddedRedis, free_port, running_embedded_url
from giftstream.server.realtime.gateway import GATEWAY_HEADER
from giftstream.server.workers import RestartPolicy, parse_workers
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.processes import ServerProcess, run_cli

START_S = 90.0  # N interpreters start on a machine other test runs share
tokens = TokenMaker(JWT_SECRET)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", "--workers", "2").start(timeout=START_S)
    try:
        yield proc
    finally:
        if proc.running:
            proc.kill()
            for pid in worker_pids(proc, require=False):
                psutil.Process(pid).kill()
        stop_orphan_redis(tmp_path / "data")


def listeners(proc: ServerProcess, port: int) -> set[int]:
    """The supervisor's child processes holding a LISTEN socket on `port`."""
    assert proc.proc is not None
    found = set()
    for child in psutil.Process(proc.proc.pid).children():
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            found.add(child.pid)
    return found


def worker_pids(proc: ServerProcess, require: bool = True) -> set[int]:
    if not proc.running:
        return set()
    pids = listeners(proc, proc.port)
    assert not require or len(pids) == 2, pids
    return pids


def wait_for(check: Callable[[], bool], what: str, proc: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n" + "".join(proc.log)
        time.sleep(0.05)


def stop_orphan_redis(data_dir: Path) -> None:
    """A supervisor killed -9 leaves its redis-server: adopt it and stop it."""
    if running_embedded_url(data_dir / "redis") is not None:
        EmbeddedRedis(data_dir / "redis").start().stop()


async def open_on(
    proc: ServerProcess, wanted: Callable[[str], bool], tries: int = 200
) -> tuple[WsClient, str]:
    """A connection that landed on a worker whose gateway id is `wanted`: the kernel
    spreads connections over the workers, so a few tries reach any one of them."""
    for _ in range(tries):
        conn = await connect(proc.ws_url)
        assert conn.response is not None
        gateway = conn.response.headers[GATEWAY_HEADER]
        if wanted(gateway):
            return WsClient(conn), gateway
        await conn.close()
    raise AssertionError(f"no connection reached the wanted worker in {tries} tries")


async def gateways_reached(proc: ServerProcess, tries: int = 200) -> set[str]:
    """The gateway ids connections land on, until two are seen (or `tries` run out)."""
    seen: set[str] = set()
    for _ in range(tries):
        async with connect(proc.ws_url) as conn:
            assert conn.response is not None
            seen.add(conn.response.headers[GATEWAY_HEADER])
        if len(seen) == 2:
            break
    return seen


def ready_gateways(proc: ServerProcess) -> list[str]:
    """The gateway id of every worker ready line, in order."""
    lines = [line for line in proc.log if "giftstream worker ready" in line]
    return [line.rsplit("gateway=", 1)[1].split()[0] for line in lines]


# ---- the options --------------------------------------------------------------------------


def test_workers_counts_and_auto() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == parse_workers("0") == (psutil.cpu_count() or 1)
    for bad in ("-1", "two", "257", ""):
        with pytest.raises(ValueError, match="from 0 to 256, or auto"):
            parse_workers(bad)


def test_a_bad_workers_value_is_refused_by_name(tmp_path: Path) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path), env={"GIFTSTREAM_WORKERS": "many"})
    assert result.returncode == 2
    assert "GIFTSTREAM_WORKERS = 'many': must be a whole number" in result.stderr


def test_restarts_slow_down_and_stop_at_the_cap() -> None:
    """A worker that keeps dying is restarted later each time, and the sixth death within a
    minute is not restarted at all: a crash loop cannot spin."""
    policy = RestartPolicy()
    assert [policy.after_death(t) for t in (0, 1, 2, 3, 4)] == [0.5, 1, 2, 4, 8]
    assert policy.after_death(5) is None
    assert policy.after_death(61.5) == 4  # the deaths at 0 and 1 left the window: 4th
    assert RestartPolicy(limit=99).after_death(0) == 0.5
    slow = RestartPolicy(limit=99)
    assert [slow.after_death(t) for t in range(7)][-1] == 10  # capped


# ---- real processes -----------------------------------------------------------------------


def test_two_workers_share_both_ports_and_one_redis_and_stop_on_sigterm(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    proc = two_workers
    log = "".join(proc.log)
    assert sum("giftstream ready" in line for line in proc.log) == 1, log
    pids = worker_pids(proc)
    assert listeners(proc, proc.admin_port) == pids  # the admin port too
    assert proc.proc is not None and proc.proc.pid not in pids  # the supervisor serves nothing
    # connections land on both, and they are the two workers that said they were ready
    assert asyncio.run(gateways_reached(proc)) == set(ready_gateways(proc))
    # one embedded Redis, the data dir's, for both
    url = running_embedded_url(tmp_path / "data" / "redis")
    assert url is not None
    worker_lines = [line for line in proc.log if "giftstream worker ready" in line]
    assert len(worker_lines) == 2 and all(f"redis={url}" in line for line in worker_lines)
    (redis,) = [c for c in psutil.Process(proc.proc.pid).children() if "redis" in c.name()]
    workers = [psutil.Process(pid) for pid in pids]
    assert proc.stop(signal.SIGTERM, timeout=60) == 0
    _, alive = psutil.wait_procs([*workers, redis], timeout=10)
    assert not alive
    assert running_embedded_url(tmp_path / "data" / "redis") is None
    log = "".join(proc.log)
    for worker in (1, 2):  # each drained as one server does
        assert f"[worker {worker}] giftstream.server.app: giftstream stopped" in log
    assert "giftstream stopped (2 workers)" in log


def test_a_worker_killed_9_is_restarted_and_the_port_keeps_serving(
    two_workers: ServerProcess,
) -> None:
    proc = two_workers
    before = worker_pids(proc)
    victim, survivor = sorted(before)

    async def scenario() -> None:
        # a client of the survivor is not disturbed by its sibling's death
        on_survivor, gateway = await open_on(proc, lambda g: True)
        welcome = await on_survivor.request({"type": "hello", "token": tokens("ann")})
        assert welcome["type"] == "welcome"
        psutil.Process(victim).kill()
        await asyncio.to_thread(
            wait_for,
            lambda: (
                "serving again" in "".join(proc.log)
                and len(listeners(proc, proc.port) - before) == 1
                and len(listeners(proc, proc.admin_port) - before) == 1
            ),
            "restarted worker",
            proc,
            START_S,
        )
        assert worker_pids(proc) & before == {survivor}
        reached = await gateways_reached(proc)
        assert len(reached) == 2 and reached <= set(ready_gateways(proc))
        assert len(ready_gateways(proc)) == 3  # the two first, and the restarted one
        if gateway in reached:  # we were on the survivor: still connected, still answered
            pong = await on_survivor.request({"type": "ping"})
            assert pong["type"] == "pong"
        await on_survivor.close()

    asyncio.run(scenario())
    assert "was killed by SIGKILL: restarting it" in "".join(proc.log)
    assert proc.stop(signal.SIGTERM, timeout=60) == 0


def test_workers_drain_when_their_supervisor_is_killed_9(
    two_workers: ServerProcess,
) -> None:
    """No orphan keeps serving the port with nobody to restart or stop it."""
    workers = [psutil.Process(pid) for pid in worker_pids(two_workers)]
    two_workers.kill()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "".join(two_workers.log)
    log = "".join(two_workers.log)
    for worker in (1, 2):
        assert f"[worker {worker}] giftstream.workers: the supervisor is gone: draining" in log
        assert f"[worker {worker}] giftstream.server.app: giftstream stopped" in log


def test_demo_prints_its_block_once_and_gives_its_coins_once(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", "--workers", "2", "--demo").start(timeout=START_S)
    try:
        wait_for(lambda: "Ctrl-C stops" in "".join(proc.log), "demo block", proc, 30)

        async def coins_of_ann_on_both() -> set[int]:
            coins = set()
            for wanted in (lambda g: True, lambda g: g not in gateways):
                client, gateway = await open_on(proc, wanted)
                gateways.add(gateway)
                welcome = await client.request({"type": "hello", "token": tokens("ann")})
                coins.add(welcome["coins"])
                await client.close()
            return coins

        gateways: set[str] = set()
        assert asyncio.run(coins_of_ann_on_both()) == {17_500}
        assert len(gateways) == 2
        log = "".join(proc.log)
        assert log.count("giftstream is running.") == 1
        assert log.count("Ctrl-C stops the server and its Redis.") == 1
        assert proc.stop(signal.SIGINT, timeout=60) == 0
    finally:
        if proc.running:
            proc.kill()
        stop_orphan_redis(tmp_path / "data")


def test_a_taken_port_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    """SO_REUSEPORT would let the workers join another server's port; the supervisor
    refuses it by name instead."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--admin-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path),
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (--port): Address already in use" in result.stderr
    assert "worker 1 starting" not in result.stderr
    assert running_embedded_url(tmp_path / "redis") is None


def test_a_worker_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead_redis = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    result = run_cli(
        "serve",
        "--workers",
        "2",
        "--port",
        str(free_port()),
        "--admin-port",
        str(free_port()),
        "--data-dir",
        str(tmp_path),
        "--redis-url",
        dead_redis,
        timeout=90,
    )
    assert result.returncode == 1
    assert "worker 1: cannot reach Redis at" in result.stderr
    assert "worker 1 exited with code 1 while starting: stopping" in result.stderr
    assert "worker 2 starting" not in result.stderr  # one clear error, not one per worker


# ---- one room across workers --------------------------------------------------------------


def test_a_gift_sent_through_one_worker_reaches_a_viewer_on_the_other(
    two_workers: ServerProcess,
) -> None:
    proc = two_workers

    async def scenario() -> None:
        async with AdminClient(proc.admin_url, WEBHOOK_SECRET) as admin:
            await admin.buy("ann", "coins_700")
        creator, _ = await open_on(proc, lambda g: True)
        await creator.request({"type": "hello", "token": tokens("cara", "creator")})
        assert (await creator.request({"type": "go_live", "title": "Both"}))["type"] == "live"
        viewer, on_a = await open_on(proc, lambda g: True)
        sender, _ = await open_on(proc, lambda g: g != on_a)  # on the other worker, B
        for client, user in ((viewer, "vic"), (sender, "ann")):
            welcome = await client.request({"type": "hello", "token": tokens(user)})
            assert welcome["type"] == "welcome", welcome
            joined = await client.request({"type": "join", "room": "cara"})
            assert joined["type"] == "joined", joined
        ok = await sender.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "across-workers"}
        )
        assert ok["type"] == "gift_ok", ok
        (gift,) = await viewer.wait_for_room_events(1, kind="gift", timeout=20)
        assert (gift["sender"]["id"], gift["gift"]["id"], gift["count"]) == ("ann", "heart", 1)
        for client in (creator, viewer, sender):
            await client.close()

    asyncio.run(scenario())
