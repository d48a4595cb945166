"""`giftstream serve` refuses a Redis that may evict keys (an evicted wallet or idempotency
record would lose or double money), with one line, whether CONFIG tells or only INFO does;
it starts on `noeviction`, warning when the Redis keeps no AOF or will not say its policy.
Each test runs a redis-server of its own, configured as an operator might have left it."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from giftstream.server.embedded_redis import answers_ping, find_redis_server, free_port
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.processes import ServerProcess, run_cli

APP_PASSWORD = "app-password-0123456789"


@contextlib.contextmanager
def own_redis(tmp_path: Path, *config: str) -> Iterator[str]:
    """A redis-server on a free loopback port with `config` on its command line; its URL."""
    port = free_port()
    work = tmp_path / f"redis-{port}"
    work.mkdir()
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(work),
            "--save",
            "",
            *config,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not answers_ping("127.0.0.1", port):
            assert proc.poll() is None, f"redis-server {config} exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in 30 s"
            time.sleep(0.02)  # a child process starting: nothing to wait on but its port
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


def app_user(url: str, *denied: str) -> str:
    """The URL of a user that may run every command but `denied` (an ACL, as managed Redis
    services set one), with a password that must never reach a log line."""
    admin = redis.Redis.from_url(url)
    try:
        admin.acl_setuser(
            "app",
            enabled=True,
            reset=True,
            passwords=[f"+{APP_PASSWORD}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", *(f"-{command}" for command in denied)],
        )
    finally:
        admin.close()
    return url.replace("redis://", f"redis://app:{APP_PASSWORD}@")


def serve(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`giftstream serve` on `url`; a server that starts is stopped by the timeout, which
    fails the test (it was to refuse)."""
    return run_cli(
        "serve",
        "--redis-url",
        url,
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--admin-port",
        "0",
        "--jwt-secret",
        JWT_SECRET,
        "--webhook-secret",
        WEBHOOK_SECRET,
        timeout=60,
    )


def refusal_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line the operator reads, and nothing else of ours on stderr."""
    assert done.returncode != 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "allkeys-random"])
def test_serve_refuses_an_evicting_redis(tmp_path: Path, policy: str) -> None:
    with own_redis(tmp_path, "--maxmemory-policy", policy) as url:
        line = refusal_line(serve(url, tmp_path / "data"))
    assert line.startswith(f"giftstream: error: Redis at {url} has maxmemory-policy {policy}")
    assert "set maxmemory-policy noeviction" in line


@pytest.mark.parametrize("denied", ["acl", "renamed"])
def test_without_config_info_tells_and_serve_still_refuses(tmp_path: Path, denied: str) -> None:
    """Managed Redis denies CONFIG (an ACL) or renames it: INFO memory says the policy."""
    renamed = ("--rename-command", "CONFIG", "") if denied == "renamed" else ()
    with own_redis(tmp_path, "--maxmemory-policy", "allkeys-lru", *renamed) as url:
        target = app_user(url, "config") if denied == "acl" else url
        with pytest.raises(redis.ResponseError):  # CONFIG really is unavailable to it
            redis.Redis.from_url(target).config_get("maxmemory-policy")
        line = refusal_line(serve(target, tmp_path / "data"))
    assert "has maxmemory-policy allkeys-lru" in line
    assert APP_PASSWORD not in line


def test_serve_starts_on_noeviction_and_warns_without_aof(tmp_path: Path) -> None:
    with own_redis(tmp_path, "--maxmemory-policy", "noeviction", "--appendonly", "no") as url:
        server = ServerProcess(tmp_path / "data", "--redis-url", url).start()
        code = server.stop()
    assert code == 0
    warnings = [line for line in server.log if "keeps no AOF" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], "".join(server.log)


def test_serve_starts_on_noeviction_with_aof_without_a_warning(tmp_path: Path) -> None:
    with own_redis(tmp_path, "--maxmemory-policy", "noeviction", "--appendonly", "yes") as url:
        server = ServerProcess(tmp_path / "data", "--redis-url", url).start()
        code = server.stop()
    assert code == 0
    assert not [line for line in server.log if "WARNING" in line and "Redis" in line], server.log


def test_a_redis_that_will_not_say_gets_a_warning_not_a_refusal(tmp_path: Path) -> None:
    with own_redis(tmp_path, "--maxmemory-policy", "noeviction") as url:
        target = app_user(url, "config", "info")
        server = ServerProcess(tmp_path / "data", "--redis-url", target).start()
        code = server.stop()
    assert code == 0
    log = "".join(server.log)
    assert "cannot read the maxmemory-policy" in log
    assert APP_PASSWORD not in log
