"""The embedded Redis starts on a free port, keeps its AOF in the data dir, and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from giftstream.server.embedded_redis import EmbeddedRedis


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
