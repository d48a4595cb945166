"""`redact_url` (server/config.py): URLs fit for a log line, and the commands (relay, consume,
audit, trim, serve) showing only those (real processes, a real Redis)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from giftstream.server.config import redact_url
from giftstream.server.embedded_redis import free_port
from tests.processes import GIFTSTREAM, run_cli


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("redis://app:hunter2@10.0.0.5:6379/2", "redis://app:***@10.0.0.5:6379/2"),
        ("rediss://:p%40ss%3Aw@host:6380/0", "rediss://:***@host:6380/0"),  # percent-encoded
        ("redis://:a@b@host:6379/0", "redis://:***@host:6379/0"),  # an unencoded @ in it
        ("redis://:pa,ss@host:6379/0", "redis://:***@host:6379/0"),  # a comma: not a list
        ("redis://host:6379/0?password=hunter2&db=1", "redis://host:6379/0?password=***&db=1"),
        ("unix://:hunter2@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),  # nothing to hide
        ("redis://app@host:6379/0", "redis://app@host:6379/0"),  # a Redis user alone is a name
        ("nats://relay:hunter2@nats-1:4222", "nats://relay:***@nats-1:4222"),
        ("nats://s3cr3tt0ken@nats-1:4222", "nats://***@nats-1:4222"),  # a NATS token
        ("tls://u:hunter2@a:4222,tls://u:hunter2@b:4222", "tls://u:***@a:4222,tls://u:***@b:4222"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_redact_url(url: str, logged: str) -> None:
    assert redact_url(url) == logged


def test_relay_and_consume_never_log_a_password() -> None:
    """Redis unreachable at start: one line naming its URL, without the password."""
    bad_redis = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    nats_url = f"nats://127.0.0.1:{free_port()}"  # never reached: Redis fails first
    for command in (["relay", "--nats", nats_url], ["consume", "--group", "g"]):
        result = run_cli(*command, "--redis-url", bad_redis, timeout=20)
        assert result.returncode == 1, result.stderr
        assert "hunter2" not in result.stderr, result.stderr
        assert f"cannot reach Redis at {redact_url(bad_redis)}" in result.stderr


@pytest.mark.parametrize(
    ("command", "exit_code", "says"),
    [
        (["audit"], 2, "cannot audit Redis at"),
        (["trim"], 1, "cannot trim in Redis at"),
        (["serve", "--port", "0", "--admin-port", "0"], 1, "cannot reach Redis at"),
    ],
)
def test_commands_never_print_a_password(
    tmp_path: Path, command: list[str], exit_code: int, says: str
) -> None:
    """`giftstream audit`, `trim` and `serve` with Redis unreachable: the one error line
    names the URL redacted."""
    bad_redis = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    args = [*command, "--data-dir", str(tmp_path), "--redis-url", bad_redis]
    result = run_cli(*args, timeout=20)
    assert result.returncode == exit_code, result.stderr
    assert "hunter2" not in result.stdout + result.stderr, result.stderr
    assert f"{says} {redact_url(bad_redis)}" in result.stderr


def test_relay_logs_its_nats_url_without_the_password(redis_url: str) -> None:
    """Up and retrying an unreachable NATS with a password in its URL: the password is in
    none of its log lines."""
    nats_url = f"nats://relay:hunter2@127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            *GIFTSTREAM,
            "relay",
            "--nats",
            nats_url,
            "--redis-url",
            redis_url,
            "--log-level",
            "DEBUG",
            "--lease-ttl-ms",
            "1000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)  # it starts, takes the lease, and fails to reach NATS a few times
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "relay ready" in stderr and "nats://relay:***@127.0.0.1:" in stderr, stderr
    assert "JetStream unavailable" in stderr, stderr
    assert "hunter2" not in stderr, stderr
