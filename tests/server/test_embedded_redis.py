"""The embedded Redis starts on a free port, keeps its AOF in the data dir, and restarts;
the one a killed owner leaves running is adopted by the next owner, never doubled."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from giftstream.server.embedded_redis import (
    LOCK_FILE,
    OWNER_FILE,
    EmbeddedRedis,
    EmbeddedRedisBusy,
    answers_ping,
)


def test_data_survives_a_clean_restart(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        client = redis.Redis.from_url(first.url)
        client.set("coins", 42)
        client.close()
    assert any(tmp_path.glob("appendonly*")), "AOF files live in the data dir"
    with EmbeddedRedis(tmp_path) as second:
        client = redis.Redis.from_url(second.url)
        assert client.get("coins") == b"42"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()


def test_relative_data_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` passes ./data; redis-server resolves paths after changing directory."""
    monkeypatch.chdir(tmp_path)
    with EmbeddedRedis(Path("data") / "redis") as embedded:
        assert (tmp_path / "data" / "redis" / "redis.log").is_file()
        assert (tmp_path / "data" / "redis" / "redis.url").read_text().strip() == embedded.url
    assert not (tmp_path / "data" / "redis" / "redis.url").exists()


# ---- an orphan: the redis-server of an owner killed with -9 ------------------------------

OWNER = """
import sys, time
import redis
from giftstream.server.embedded_redis import EmbeddedRedis
embedded = EmbeddedRedis(sys.argv[1]).start()
client = redis.Redis.from_url(embedded.url)
client.set("coins", 42)
client.close()
print(embedded.url, flush=True)
time.sleep(600)
"""

ADOPTER = """
import sys
from giftstream.server.embedded_redis import EmbeddedRedis, EmbeddedRedisBusy
try:
    embedded = EmbeddedRedis(sys.argv[1]).start()
except EmbeddedRedisBusy as exc:
    print("busy", exc, flush=True)
    sys.exit(0)
print("adopted" if embedded.adopted else "started", embedded.url, flush=True)
sys.stdin.readline()
embedded.stop()
"""


def python(script: str, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def orphan(tmp_path: Path) -> Iterator[str]:
    """The URL of a redis-server whose owner was killed with -9 (it set coins to 42 first);
    stopped after the test if the test did not."""
    owner = python(OWNER, tmp_path)
    assert owner.stdout is not None
    url = owner.stdout.readline().strip()
    owner.kill()
    owner.wait(10)
    try:
        assert url.startswith("redis://") and answers(url), "the owner's redis-server lives on"
        assert not lock_is_free(tmp_path)
        yield url
    finally:
        client = redis.Redis.from_url(url)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()


def answers(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    return answers_ping(host, int(port))


def lock_is_free(data_dir: Path) -> bool:
    """No redis-server holds the data dir's lock: none runs on its files."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_an_orphan_is_adopted_and_stopped_by_its_adopter(tmp_path: Path, orphan: str) -> None:
    adopter = EmbeddedRedis(tmp_path, appendfsync="always").start()
    try:
        assert adopter.adopted and adopter.url == orphan
        client = redis.Redis.from_url(adopter.url)
        assert client.get("coins") == b"42"
        assert client.info("server")["process_id"] == adopter.adopted_pid
        assert client.config_get("appendfsync")["appendfsync"] == "always"  # as asked
        client.close()
        assert (tmp_path / "redis.url").read_text().strip() == orphan
    finally:
        adopter.stop()
    assert not answers(orphan) and lock_is_free(tmp_path)  # stopped as if we had started it
    assert not (tmp_path / "redis.url").exists()
    with EmbeddedRedis(tmp_path) as again:  # its AOF was flushed: the next one finds coins
        client = redis.Redis.from_url(again.url)
        assert not again.adopted and client.get("coins") == b"42"
        client.close()


def test_an_adopted_orphan_killed_restarts_as_our_own(tmp_path: Path, orphan: str) -> None:
    """kill() and start() of an adopted one, as the bank test does to its Redis."""
    adopter = EmbeddedRedis(tmp_path).start()
    try:
        adopter.kill()
        assert not answers(orphan) and not adopter.adopted
        adopter.start()
        assert adopter.url == orphan and adopter.process is not None
        client = redis.Redis.from_url(adopter.url)
        assert client.get("coins") == b"42"
        client.close()
    finally:
        adopter.stop()
    assert not answers(orphan) and lock_is_free(tmp_path)


def test_two_adopters_never_both_adopt(tmp_path: Path, orphan: str) -> None:
    adopters = [python(ADOPTER, tmp_path) for _ in range(2)]
    try:
        said = sorted(proc.stdout.readline().split()[0] for proc in adopters if proc.stdout)
        assert said == ["adopted", "busy"], said
    finally:
        for proc in adopters:
            with contextlib.suppress(BrokenPipeError):
                proc.communicate("\n", timeout=20)
    assert [proc.returncode for proc in adopters] == [0, 0]
    assert not answers(orphan) and lock_is_free(tmp_path)


def test_a_live_owner_is_never_adopted(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as owner:
        with pytest.raises(EmbeddedRedisBusy) as busy:
            EmbeddedRedis(tmp_path).start()
        assert str(busy.value) == (
            f"another process (pid {os.getpid()}) already runs the embedded Redis of "
            f"{tmp_path.resolve()} at {owner.url}: stop that process first"
        )
        assert answers(owner.url) and not owner.adopted
    assert not answers(owner.url) and lock_is_free(tmp_path)


def test_the_owner_lock_is_not_inherited_by_redis_server(tmp_path: Path) -> None:
    """Else a killed owner's lock would live on in its redis-server, and no orphan could
    ever be told from a live owner."""
    with EmbeddedRedis(tmp_path) as owner:
        assert owner.process is not None
        fds = Path(f"/proc/{owner.process.pid}/fd")
        if not fds.is_dir():
            pytest.skip("no /proc to list redis-server's open files")
        held = {os.path.realpath(fd) for fd in fds.iterdir()}
        assert str(tmp_path.resolve() / LOCK_FILE) in held
        assert str(tmp_path.resolve() / OWNER_FILE) not in held
