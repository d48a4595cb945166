"""`giftstream consume` and `giftstream trim` as an operator runs them: real processes, a
real Redis, real signals; flags win over the environment; a bad option or an unreachable
Redis is one clear line and no traceback."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from giftstream.server.cli import CONSUME_NUMBERS, DEFAULT_TRIM_KEEP
from giftstream.server.embedded_redis import free_port
from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import GROUP as CHECKPOINT_GROUP
from giftstream.server.ledger.consumer import group_lag, run_consumer
from giftstream.server.money import keys
from tests.processes import run_cli
from tests.server.ledger.ledger_workload import (
    expected_earnings,
    ledger,
    new_wallet,
    settle,
    stored_earnings,
    text,
    until,
)
from tests.server.ledger.worker_process import WorkerProcess


class Consume(WorkerProcess):
    """`giftstream consume …` in a child process, ready when it logs "consumer ready"."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(["consume", *args], env)

    def wait_ready(self, timeout: float = 20) -> None:
        self.wait_for_log("consumer ready", timeout)


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error: ours and argparse's ("giftstream: error: …"), and
    logged ones (" ERROR ")."""
    return [line for line in stderr.splitlines() if "error:" in line or " ERROR " in line]


@pytest.fixture
def consumers() -> Iterator[list[Consume]]:
    started: list[Consume] = []
    yield started
    for proc in started:
        proc.kill()


def test_consume_defaults_match_run_consumer() -> None:
    """The CLI's numbers and their help are run_consumer's own defaults."""
    params = inspect.signature(run_consumer).parameters
    for flag, default, _, _ in CONSUME_NUMBERS:
        assert params[flag.removeprefix("--").replace("-", "_")].default == default, flag


def test_consume_runs_a_handler_in_its_group_until_sigterm(
    redis_url: str, consumers: list[Consume]
) -> None:
    """The earnings handler counts every gift once; flags win over GIFTSTREAM_GROUP, the
    environment names the consumer, metrics are served; SIGTERM stops it with 0."""
    metrics_port = free_port()
    proc = Consume(
        "--group",
        "earnings",
        "--redis-url",
        redis_url,
        "--block-ms",
        "50",
        "--metrics-port",
        str(metrics_port),
        env={"GIFTSTREAM_GROUP": "from-env", "GIFTSTREAM_CONSUMER": "worker-7"},
    )
    consumers.append(proc)
    proc.wait_ready()

    async def check() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            added = await settle(await new_wallet(client), 12)
            expected = expected_earnings(await ledger(client))

            async def counted() -> bool:
                return await stored_earnings(client, list(expected)) == expected

            async def acked() -> bool:
                return await group_lag(client, keys.LEDGER, "earnings") == 0

            await until(counted, what="every gift counted")
            await until(acked, what="every entry acked")
            groups = [text(g["name"]) for g in await client.xinfo_groups(keys.LEDGER)]
            assert groups == ["earnings"]  # the flag won over GIFTSTREAM_GROUP
            consumers = await client.xinfo_consumers(keys.LEDGER, "earnings")
            assert [text(c["name"]) for c in consumers] == ["worker-7"]  # from the env
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                metrics = await response.text()
            assert f'giftstream_consumer_acked_total{{group="earnings"}} {added}.0' in metrics
        finally:
            await client.aclose()

    asyncio.run(check())
    assert proc.stop() == 0
    assert any("consumer earnings/worker-7 stopped" in line for line in proc.log), proc.log


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        ([], {}, "--group / GIFTSTREAM_GROUP is required"),
        (["--group", "relay"], {}, "--group 'relay': that group is the JetStream relay's"),
        ([], {"GIFTSTREAM_GROUP": "relay"}, "GIFTSTREAM_GROUP 'relay'"),
        (["--group", "g", "--handler", "nope"], {}, "--handler 'nope': no such handler"),
        (["--group", "g"], {"GIFTSTREAM_HANDLER": "nope"}, "GIFTSTREAM_HANDLER 'nope'"),
        (["--group", "g", "--handler", "checkpoint"], {"GIFTSTREAM_HANDLER": "nope"}, None),
        (["--group", "g", "--batch", "0"], {}, "argument --batch: must be an integer of at least"),
        (["--group", "g", "--claim-idle-ms", "x"], {}, "argument --claim-idle-ms"),
        (["--group", "g", "--metrics-port", "-1"], {}, "argument --metrics-port"),
        (["--group", "g", "--redis-url", "http://x"], {}, "--redis-url"),
        (["--group", "g", "--redis-url", "redis://127.0.0.1:1/0"], {}, "cannot reach Redis"),
        (["--group", "g", "--data-dir", "{tmp}"], {}, "no embedded Redis data in"),
    ],
)
def test_consume_bad_start_is_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str | None
) -> None:
    """A flag wins over its variable (a bad GIFTSTREAM_HANDLER is ignored when --handler is
    given: that start fails only because no Redis runs)."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--redis-url" not in args and "--data-dir" not in args:
        args += ["--redis-url", "redis://127.0.0.1:1/0"]
    result = run_cli("consume", *args, env=env, timeout=20)
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert (says or "cannot reach Redis") in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_consume_metrics_port_taken_is_one_clear_line(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "consume",
            "--group",
            "g",
            "--redis-url",
            redis_url,
            "--metrics-port",
            str(port),
            timeout=20,
        )
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in result.stderr


def test_trim_keeps_what_groups_and_the_checkpoint_need(
    redis_url: str, consumers: list[Consume]
) -> None:
    """Nothing without a group, nothing without a checkpoint, never past a group's oldest
    unacked entry; then, everything acked, all but --keep; the audit passes throughout."""

    def trim(*args: str, env: dict[str, str] | None = None) -> str:
        result = run_cli("trim", "--redis-url", redis_url, *args, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return result.stdout.strip()

    async def fill() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        await settle(await new_wallet(client), 40)
        ids = [e.id for e in await ledger(client)]
        await client.aclose()
        return ids

    assert trim() == f"trimmed nothing from {keys.LEDGER}: no such stream; 0 entries left"
    ids = asyncio.run(fill())
    total = len(ids)
    assert trim("--keep", "0") == (
        f"trimmed nothing from {keys.LEDGER}: no consumer group (one may come later); "
        f"{total} entries left"
    )

    async def laggard_reads(count: int) -> None:  # reads and acks none: a stalled consumer
        client = aioredis.Redis.from_url(redis_url)
        await client.xgroup_create(keys.LEDGER, "laggard", id="0")
        await client.xreadgroup("laggard", "slow", {keys.LEDGER: ">"}, count=count)
        await client.aclose()

    asyncio.run(laggard_reads(8))
    assert "no checkpoint yet" in trim("--keep", "0")

    checkpoint = Consume(
        "--group",
        CHECKPOINT_GROUP,
        "--handler",
        "checkpoint",
        "--consumer",
        "c1",
        "--block-ms",
        "50",
        "--redis-url",
        redis_url,
    )
    consumers.append(checkpoint)
    checkpoint.wait_ready()

    async def checkpoint_caught_up() -> None:
        client = aioredis.Redis.from_url(redis_url)

        async def acked() -> bool:
            return await group_lag(client, keys.LEDGER, CHECKPOINT_GROUP) == 0

        await until(acked, what="the checkpoint group caught up")
        await client.aclose()

    asyncio.run(checkpoint_caught_up())
    held = trim("--keep", "5")  # the laggard has all 8 it read pending
    assert held == (
        f"trimmed 0 entries of {keys.LEDGER} below {ids[0]} (held there by group laggard); "
        f"{total} entries left"
    )

    async def laggard_acks(count: int) -> None:
        client = aioredis.Redis.from_url(redis_url)
        await client.xack(keys.LEDGER, "laggard", *ids[:count])
        await client.aclose()

    asyncio.run(laggard_acks(3))
    assert trim("--keep", "5").startswith(f"trimmed 3 entries of {keys.LEDGER} below {ids[3]}")

    async def laggard_catches_up() -> None:
        client = aioredis.Redis.from_url(redis_url)
        read: Any = await client.xreadgroup("laggard", "slow", {keys.LEDGER: ">"})
        await client.xack(keys.LEDGER, "laggard", *ids[3:8], *[i for i, _ in read[0][1]])
        await client.aclose()

    asyncio.run(laggard_catches_up())
    # the flag wins over GIFTSTREAM_TRIM_KEEP; a bad variable is not even read then
    assert trim("--keep", "5", env={"GIFTSTREAM_TRIM_KEEP": "nope"}) == (
        f"trimmed {total - 3 - 5} entries of {keys.LEDGER} below {ids[-5]} (held there by "
        f"the last 5 entries kept); 5 entries left"
    )
    assert trim(env={"GIFTSTREAM_TRIM_KEEP": "4"}).startswith("trimmed 1 entries of ")
    assert checkpoint.stop() == 0

    async def audited() -> None:
        client = aioredis.Redis.from_url(redis_url)
        report = await audit(client)
        await client.aclose()
        assert report.ok and report.entries == total, report.breaches

    asyncio.run(audited())
    assert trim().endswith(
        f"it holds fewer than the {DEFAULT_TRIM_KEEP} entries kept; 4 entries left"
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--keep", "-1"], {}, "--keep: must be an integer of at least 0, not '-1'"),
        ([], {"GIFTSTREAM_TRIM_KEEP": "lots"}, "GIFTSTREAM_TRIM_KEEP: must be an integer"),
        (["--redis-url", "redis://127.0.0.1:1/0"], {}, "cannot trim in Redis at"),
        (["--redis-url", "redis://:hunter2@127.0.0.1:1/0"], {}, "redis://:***@127.0.0.1:1/0"),
    ],
)
def test_trim_bad_start_is_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    if "--redis-url" not in args:
        args += ["--redis-url", "redis://127.0.0.1:1/0"]
    result = run_cli("trim", *args, env=env)
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr
