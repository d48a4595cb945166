"""`giftstream serve | token | audit` as an operator runs them: real processes, real signals."""

from __future__ import annotations

import argparse
import gc
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import redis
from websockets.exceptions import ConnectionClosed

from giftstream.server.app import GC_YOUNG_THRESHOLD, tune_gc
from giftstream.server.config import Limits, add_options, build_settings, resolve
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.processes import ServerProcess, run_cli


@pytest.fixture
def server_proc(tmp_path: Path, redis_url: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data", "--redis-url", redis_url).start()
    yield proc
    proc.kill()


def test_sigterm_closes_sockets_1001_and_exits_0(server_proc: ServerProcess) -> None:
    from websockets.sync.client import connect

    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, JWT_SECRET)
    with connect(server_proc.ws_url) as ws:
        ws.send(f'{{"type":"hello","token":"{token}"}}')
        assert '"welcome"' in ws.recv(timeout=5)
        assert server_proc.stop() == 0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1001
    assert "giftstream stopped" in "".join(server_proc.log)


def test_the_served_process_tunes_its_collector_and_exports_it(
    server_proc: ServerProcess,
) -> None:
    """Full collections stall every room, so a serving node makes them rare (app.tune_gc),
    and its /metrics lets an operator count them."""
    deadline = time.monotonic() + 10  # it is tuned just after the ready line
    while "young collections every 10000" not in "".join(server_proc.log):
        assert time.monotonic() < deadline, "".join(server_proc.log)
        time.sleep(0.05)
    with urllib.request.urlopen(server_proc.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'python_gc_collections_total{generation="2"}' in text
    assert "process_open_fds" in text


def test_tune_gc_raises_the_young_threshold_and_freezes_start_up() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--port", "nope"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        ([], {"GIFTSTREAM_PORT": "x"}, "GIFTSTREAM_PORT"),
        (["--redis-url", "http://localhost"], {}, "--redis-url"),
        (["--jwt-secret", "short"], {}, "--jwt-secret"),
        (["--catalog", "/nonexistent.toml"], {}, "--catalog"),
        (["--allowed-origins", "not an origin"], {}, "--allowed-origins"),
        (["--gifts-per-s", "0"], {}, "--gifts-per-s"),
        (["--gifts-per-s", "nan"], {}, "--gifts-per-s"),
        ([], {"GIFTSTREAM_MESSAGES_PER_S": "-5"}, "GIFTSTREAM_MESSAGES_PER_S"),
        (["--redis-url", "redis://127.0.0.1:1/0"], {}, "cannot reach Redis"),
    ],
)
def test_bad_start_is_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    ports = [] if "GIFTSTREAM_PORT" in env else ["--port", "0"]  # a flag would win
    result = run_cli(
        "serve",
        "--data-dir",
        str(tmp_path),
        *ports,
        "--admin-port",
        "0",
        *args,
        env=env,
        timeout=20,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_catalog_stops_start(tmp_path: Path) -> None:
    catalog = tmp_path / "bad.toml"
    catalog.write_text('[[gifts]]\nid = "rose"\nname = "Rose"\ncoins = 1.5\nanimation = "a"\n')
    result = run_cli("serve", "--data-dir", str(tmp_path), "--catalog", str(catalog))
    assert result.returncode != 0
    assert "gifts[0].coins must be an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_flag_wins_over_environment(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--data-dir", str(tmp_path), "--port", "nope", env={"GIFTSTREAM_PORT": "8765"}
    )
    assert "--port" in result.stderr


def test_rate_limits_come_from_flags_and_environment(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--gifts-per-s", "50", "--data-dir", str(tmp_path)])
    settings = build_settings(resolve(args, {"GIFTSTREAM_MESSAGES_PER_S": "7.5"}))
    limits = settings.limits
    assert (limits.gifts_per_s, limits.gifts_burst) == (50.0, 100)
    assert (limits.messages_per_s, limits.messages_burst) == (7.5, 15)
    defaults = build_settings(resolve(parser.parse_args(["--data-dir", str(tmp_path)]), {}))
    assert defaults.limits == Limits()


def test_token_command(tmp_path: Path) -> None:
    result = run_cli(
        "token",
        "--user",
        "kid",
        "--name",
        "Kid",
        "--role",
        "creator",
        "--minor",
        "--ttl",
        "60",
        "--jwt-secret",
        JWT_SECRET,
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "kid" and claims["role"] == "creator" and claims["adult"] is False
    assert claims["exp"] - claims["iat"] == 60
    # without a secret it uses (and creates) the one in the data dir, as the server does
    first = run_cli("token", "--user", "ann", "--data-dir", str(tmp_path))
    secret = (tmp_path / "jwt_secret").read_text().strip()
    assert jwt.decode(first.stdout.strip(), secret, algorithms=["HS256"])["sub"] == "ann"
    assert oct((tmp_path / "jwt_secret").stat().st_mode & 0o777) == "0o600"
    bad = run_cli("token", "--user", "not valid!", "--data-dir", str(tmp_path))
    assert bad.returncode != 0 and "--user" in bad.stderr


def test_audit_passes_then_names_a_tampered_wallet(redis_url: str, tmp_path: Path) -> None:
    import asyncio

    from tests.server.workload import run_mixed_workload

    asyncio.run(run_mixed_workload(redis_url, tmp_path / "data"))
    passed = run_cli("audit", "--redis-url", redis_url)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "audit PASSED" in passed.stdout
    client = redis.Redis.from_url(redis_url)
    wallet_keys = sorted(client.scan_iter(match="giftstream:wallet:*"))
    assert wallet_keys
    client.hincrby(wallet_keys[0], "coins", 5)
    client.close()
    failed = run_cli("audit", "--redis-url", redis_url)
    assert failed.returncode == 1
    user = wallet_keys[0].decode().removeprefix("giftstream:wallet:")
    assert user in failed.stdout and "BREACH" in failed.stdout


def test_audit_of_the_embedded_redis_running_or_not(tmp_path: Path) -> None:
    """No --redis-url: audit the data dir's own Redis, the server's while it runs, else one
    started just for the audit."""
    import asyncio

    from tests.helpers import AdminClient

    data_dir = tmp_path / "data"
    proc = ServerProcess(data_dir).start()
    try:

        async def buy() -> None:
            async with AdminClient(proc.admin_url, WEBHOOK_SECRET) as admin:
                await admin.buy("ann", "coins_70", receipt="audit-embedded-1")

        asyncio.run(buy())
        running = run_cli("audit", "--data-dir", str(data_dir))
        assert running.returncode == 0 and "audit PASSED" in running.stdout, running.stderr
    finally:
        assert proc.stop() == 0
    stopped = run_cli("audit", "--data-dir", str(data_dir))
    assert stopped.returncode == 0 and "audit PASSED" in stopped.stdout, stopped.stderr
    assert stopped.stdout.startswith("1 ledger entries")
    empty = run_cli("audit", "--data-dir", str(tmp_path / "nothing-here"))
    assert empty.returncode == 2 and "no embedded Redis data" in empty.stderr
