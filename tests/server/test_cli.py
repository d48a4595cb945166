"""`giftstream serve | token | redis-url | audit` as an operator runs them, and `consume`,
`trim` and `relay` on a data dir whose server is down: real processes, real signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
from websockets.exceptions import ConnectionClosed

from giftstream.server.app import GC_YOUNG_THRESHOLD, tune_gc
from giftstream.server.cli import LEDGER_OPTIONS, build_parser
from giftstream.server.config import ConfigError, Limits, add_options, build_settings, resolve
from giftstream.server.embedded_redis import answers_ping
from giftstream.server.money import keys
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.processes import ServerProcess, run_cli
from tests.server.ledger.worker_process import WorkerProcess

LEDGER_COMMANDS = ("serve", "relay", "consume", "trim", "audit")  # each reads or writes it


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


def test_caps_and_token_checks_come_from_flags_and_environment(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_options(parser)
    flags = ["--max-connections", "500", "--jwt-audience", "gs", "--data-dir", str(tmp_path)]
    env = {"GIFTSTREAM_MAX_CONNECTIONS_PER_USER": "3", "GIFTSTREAM_JWT_LEEWAY": "5"}
    settings = build_settings(resolve(parser.parse_args(flags), env))
    limits = settings.limits
    assert (limits.max_connections, limits.max_connections_per_user) == (500, 3)
    assert limits.max_connections_per_ip == 2000
    assert (settings.jwt_leeway_s, settings.jwt_audience, settings.jwt_issuer) == (5.0, "gs", None)
    defaults = build_settings(resolve(parser.parse_args(["--data-dir", str(tmp_path)]), {}))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert defaults.limits.max_connections == soft - 256  # what the process can hold
    assert defaults.jwt_leeway_s == 30.0
    for bad in (
        ["--max-connections", "0"],
        ["--max-connections-per-ip", "-1"],
        ["--jwt-leeway", "3600"],
        ["--jwt-issuer", " "],
    ):
        with pytest.raises(ConfigError, match=f"^{bad[0]} / GIFTSTREAM_"):
            resolve(parser.parse_args([*bad, "--data-dir", str(tmp_path)]), {})


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


# ---- the options the commands share ------------------------------------------------------


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = commands.choices[name]
    return found


@pytest.mark.parametrize("command", LEDGER_COMMANDS)
def test_every_ledger_command_shares_the_ledger_key_and_its_variable(
    command: str, tmp_path: Path
) -> None:
    """One option, one variable, one default: a server and its consumers, started with the
    same environment, use the same ledger."""
    parser = subcommand(command)
    required = ["--data-dir", str(tmp_path)] + (["--group", "g"] if command == "consume" else [])
    default = resolve(parser.parse_args(required), {})
    assert default["ledger_key"] == keys.LEDGER
    from_env = resolve(parser.parse_args(required), {"GIFTSTREAM_LEDGER_KEY": "a:ledger"})
    assert from_env["ledger_key"] == "a:ledger"
    flag = parser.parse_args([*required, "--ledger-key", "b:ledger"])
    assert resolve(flag, {"GIFTSTREAM_LEDGER_KEY": "a:ledger"})["ledger_key"] == "b:ledger"
    if command == "serve":  # into the settings the wallet is built from
        assert build_settings(default).ledger_key == keys.LEDGER
        assert build_settings(from_env).ledger_key == "a:ledger"
    help_text = parser.format_help()
    for option in LEDGER_OPTIONS:
        assert option in help_text, (command, option)
    assert "GIFTSTREAM_LEDGER_KEY" in help_text


@pytest.mark.parametrize("command", ["serve", "relay", "consume"])
def test_the_log_level_is_one_option_with_its_variable(command: str) -> None:
    parser = subcommand(command)
    assert resolve(parser.parse_args([]), {})["log_level"] == "INFO"
    assert resolve(parser.parse_args([]), {"GIFTSTREAM_LOG_LEVEL": "debug"})["log_level"] == (
        "DEBUG"
    )
    assert "GIFTSTREAM_LOG_LEVEL" in parser.format_help()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "--log-level", "LOUD"], "--log-level / GIFTSTREAM_LOG_LEVEL = 'LOUD'"),
        (["consume", "--group", "g", "--log-level", "LOUD"], "--log-level"),
        (["serve", "--ledger-key", "a ledger"], "--ledger-key / GIFTSTREAM_LEDGER_KEY"),
        (["audit", "--ledger-key", ""], "--ledger-key"),
    ],
)
def test_a_bad_shared_option_is_one_clear_line(tmp_path: Path, args: list[str], says: str) -> None:
    result = run_cli(*args, "--data-dir", str(tmp_path), timeout=20)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def option_help(command: str, flag: str) -> str:
    (action,) = [a for a in subcommand(command)._actions if flag in a.option_strings]
    return str(action.help)


def test_the_redis_url_help_says_what_each_command_does() -> None:
    """`serve` starts its embedded Redis; the ledger commands use the running one or start
    their own (as the embedded Redis tests below show)."""
    assert "embedded redis-server in the data dir, started and stopped with the server" in (
        option_help("serve", "--redis-url")
    )
    for command in ("relay", "consume", "trim", "audit"):
        text = option_help(command, "--redis-url")
        assert "the server's while it runs, else one started for this command" in text, command


# ---- serve --ledger-key ------------------------------------------------------------------


async def buy_and_gift(proc: ServerProcess, key: str) -> None:
    """A purchase over the admin API and a gift over a WebSocket: two ledger entries."""
    tokens = TokenMaker(JWT_SECRET)
    async with AdminClient(proc.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_70", receipt=f"receipt-{key}")
    creator, _ = await WsClient.login(proc.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "ledger key"})
    ann, _ = await WsClient.login(proc.ws_url, tokens("ann"))
    await ann.request({"type": "join", "room": "cara"})
    sent = await ann.request(
        {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": key}
    )
    assert sent["type"] == "gift_ok", sent
    for client in (ann, creator):
        await client.close()


def test_serve_ledger_key_writes_there_and_the_audit_of_it_passes(
    tmp_path: Path, redis_url: str
) -> None:
    proc = ServerProcess(tmp_path / "data", "--redis-url", redis_url, "--ledger-key", "t:ledger")
    proc.start()
    try:
        asyncio.run(buy_and_gift(proc, "ledger-key-gift"))
    finally:
        assert proc.stop() == 0
    assert any("ledger=t:ledger" in line for line in proc.log), proc.log
    client = redis.Redis.from_url(redis_url)
    entries: Any = client.xrange("t:ledger")
    kinds = [json.loads(fields[b"data"])["kind"] for _, fields in entries]
    assert kinds == ["purchase", "gift"]
    assert client.exists(keys.LEDGER) == 0
    client.close()
    passed = run_cli("audit", "--redis-url", redis_url, "--ledger-key", "t:ledger")
    assert passed.returncode == 0 and "audit PASSED" in passed.stdout, passed.stdout
    assert passed.stdout.startswith("2 ledger entries")
    by_env = run_cli("audit", "--redis-url", redis_url, env={"GIFTSTREAM_LEDGER_KEY": "t:ledger"})
    assert by_env.returncode == 0 and "audit PASSED" in by_env.stdout, by_env.stdout
    other = run_cli("audit", "--redis-url", redis_url)  # the default ledger: not the server's
    assert other.returncode == 1 and "BREACH: wallet ann" in other.stdout, other.stdout


# ---- the embedded Redis: its URL, and the ledger commands with the server down -----------


def redis_url_of(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("redis-url", "--data-dir", str(data_dir))


def test_redis_url_prints_the_running_embedded_redis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    none = redis_url_of(data_dir)
    assert none.returncode == 1 and none.stdout == ""
    assert none.stderr.strip() == (
        f"giftstream: no embedded Redis running in {data_dir / 'redis'} "
        "(`giftstream serve` starts it)"
    )
    proc = ServerProcess(data_dir, "--demo").start()
    try:
        running = redis_url_of(data_dir)
        assert running.returncode == 0 and running.stderr == "", running.stderr
        url = running.stdout.strip()
        assert running.stdout == url + "\n"
        assert any(f"redis={url} " in line for line in proc.log), proc.log
        client = redis.Redis.from_url(url)
        assert client.ping() and client.xlen(keys.LEDGER) == 1  # the demo's welcome coins
        client.close()
        wait_for_line(proc, "Ctrl-C stops the server and its Redis.")
        block = "".join(proc.log)
        assert f"  Redis: {url} (embedded; its port changes at each start: " in block
        assert f"`giftstream redis-url --data-dir {data_dir}` prints it)" in block
        assert f"check it: `giftstream audit --data-dir {data_dir}`" in block
        # the pages, ready to click: the token in the fragment, the viewer in cara's room
        page_lines = [line.split() for line in proc.log if "#token=" in line]
        urls = [words[-1] for words in page_lines]
        assert [url.split("#token=")[0].split("/", 3)[-1] for url in urls] == [
            "?room=cara",
            "?room=cara",
            "ops",
        ]
        assert all(len(url.split("#token=")[1].split(".")) == 3 for url in urls)  # JWTs
    finally:
        assert proc.stop() == 0
    assert redis_url_of(data_dir).returncode == 1


def wait_for_line(proc: ServerProcess, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(proc.log)):
        assert time.monotonic() < deadline, "".join(proc.log)
        time.sleep(0.05)


def test_the_demo_block_writes_commands_as_they_were_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` runs .venv/bin/giftstream, which is not on PATH: the block's commands say
    .venv/bin/giftstream, so they paste as they are."""
    script = Path(sys.executable).parent / "giftstream"
    if not script.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    project = script.parents[2]
    as_run = str(script.relative_to(project))  # .venv/bin/giftstream
    monkeypatch.chdir(project)
    path = [d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != script.parent]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    monkeypatch.setattr("tests.processes.GIFTSTREAM", [as_run])
    proc = ServerProcess(tmp_path / "data", "--demo", "--ledger-key", "demo:ledger").start()
    try:
        wait_for_line(proc, "Ctrl-C stops")
    finally:
        assert proc.stop() == 0
    block = "".join(proc.log)
    data = f"--data-dir {tmp_path / 'data'}"
    assert f"`{as_run} redis-url {data}` prints it)" in block
    assert f"Ledger: demo:ledger   check it: `{as_run} audit {data} --ledger-key demo:ledger`" in (
        block
    )
    assert f"(valid 24 h; `{as_run} token --help` makes more)" in block
    python = str(Path(as_run).with_name("python"))  # .venv/bin/python: it has websockets
    assert f"Connect (e.g. `{python} -m websockets ws://" in block
    assert "`giftstream " not in block
    assert "connection caps: " in block and "no cap per address" in block  # load tests


def test_serve_with_redis_url_prints_it_redacted(tmp_path: Path, redis_url: str) -> None:
    """A password in --redis-url never reaches the output: the ready line and the block."""
    client = redis.Redis.from_url(redis_url)
    client.config_set("requirepass", "hunter2-secret")
    try:
        secret_url = redis_url.replace("redis://", "redis://:hunter2-secret@")
        proc = ServerProcess(tmp_path / "data", "--redis-url", secret_url, "--demo").start()
        try:
            wait_for_line(proc, "Ctrl-C stops the server.")
        finally:
            assert proc.stop() == 0
        output = "".join(proc.log)
        redacted = redis_url.replace("redis://", "redis://:***@")
        assert f"redis={redacted} " in output and f"  Redis: {redacted} (--redis-url)" in output
        assert "hunter2" not in output
    finally:
        authed = redis.Redis.from_url(redis_url, password="hunter2-secret")
        authed.config_set("requirepass", "")
        authed.close()
        client.close()


@pytest.mark.parametrize("command", [["audit"], ["trim"], ["relay", "--status"]])
def test_unreachable_redis_is_reported_redacted(command: list[str]) -> None:
    result = run_cli(*command, "--redis-url", "redis://:hunter2@127.0.0.1:1/0", timeout=20)
    assert result.returncode != 0
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "redis://:***@127.0.0.1:1/0" in result.stderr, result.stderr


@pytest.fixture
def server_down(tmp_path: Path) -> Path:
    """A data dir whose server bought ann coins and sent a gift, then stopped (and its
    embedded Redis with it): the ledger holds 2 entries and nothing listens."""
    data_dir = tmp_path / "data"
    proc = ServerProcess(data_dir).start()
    try:
        asyncio.run(buy_and_gift(proc, "server-down-gift"))
    finally:
        assert proc.stop() == 0
    assert redis_url_of(data_dir).returncode == 1
    return data_dir


def test_trim_and_relay_status_start_the_embedded_redis_for_themselves(
    server_down: Path,
) -> None:
    data = ["--data-dir", str(server_down)]
    trimmed = run_cli("trim", *data)
    assert trimmed.returncode == 0, trimmed.stderr
    assert trimmed.stdout.strip() == (
        f"trimmed nothing from {keys.LEDGER}: no consumer group (one may come later); "
        "2 entries left"
    )
    status = run_cli("relay", "--status", *data)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["entries"] == 2
    assert redis_url_of(server_down).returncode == 1  # each stopped the Redis it started
    audited = run_cli("audit", *data)
    assert audited.returncode == 0 and "audit PASSED" in audited.stdout


def test_consume_starts_the_embedded_redis_and_serve_waits_for_it(server_down: Path) -> None:
    """A consumer started while the server is down runs on the data dir's own Redis (one
    redis-server per data dir: `serve` refuses, in one line, until the consumer stops)."""
    consume = WorkerProcess(
        ["consume", "--group", "earnings", "--block-ms", "50", "--data-dir", str(server_down)]
    )
    try:
        consume.wait_for_log("consumer ready")
        assert consume.said("started it at redis://127.0.0.1:")
        url = redis_url_of(server_down).stdout.strip()
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while client.xinfo_groups(keys.LEDGER)[0]["lag"] != 0:
            assert time.monotonic() < deadline, consume.log
            time.sleep(0.05)
        client.close()
        refused = run_cli(
            "serve", "--data-dir", str(server_down), "--port", "0", "--admin-port", "0"
        )
        assert refused.returncode == 1
        errors = [line for line in refused.stderr.splitlines() if "error" in line]
        assert len(errors) == 1, refused.stderr
        assert (
            f"already runs the embedded Redis of {server_down.resolve() / 'redis'}" in (errors[0])
        )
        assert f"at {url}: stop that" in errors[0]
    finally:
        assert consume.stop() == 0, consume.log
    assert redis_url_of(server_down).returncode == 1
    proc = ServerProcess(server_down).start()  # the consumer gone, the server starts
    assert proc.stop() == 0


def nats_or_skip() -> str:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=0.5):
            return "nats://127.0.0.1:4222"
    except OSError:
        pytest.skip("the relay needs NATS with JetStream at 127.0.0.1:4222 (none answers)")


def test_relay_starts_the_embedded_redis_and_publishes_the_ledger(server_down: Path) -> None:
    nats_url = nats_or_skip()
    tag = uuid.uuid4().hex[:10]
    stream, prefix = f"TEST_CLI_{tag}", f"test.cli.{tag}"
    relay = WorkerProcess(
        [
            "relay",
            "--nats",
            nats_url,
            "--stream",
            stream,
            "--subject-prefix",
            prefix,
            "--data-dir",
            str(server_down),
        ]
    )
    try:
        relay.wait_for_log(f"relaying {keys.LEDGER} to JetStream stream {stream}")
        assert relay.said("started it at redis://127.0.0.1:")
        deadline = time.monotonic() + 20
        while True:  # the status of the running relay, through the Redis it started
            status = run_cli("relay", "--status", "--data-dir", str(server_down))
            assert status.returncode == 0, status.stderr
            lag = json.loads(status.stdout)
            if lag["entries"] == 0 and lag["last_delivered"] is not None:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.1)
        assert asyncio.run(stream_messages(nats_url, stream, delete=True)) == 2
    finally:
        assert relay.stop() == 0, relay.log
    assert redis_url_of(server_down).returncode == 1


async def stream_messages(nats_url: str, stream: str, *, delete: bool) -> int:
    """How many messages the stream holds; deleted after, so a shared NATS keeps nothing."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        count = int((await js.stream_info(stream)).state.messages)
        if delete:
            await js.delete_stream(stream)
        return count
    finally:
        await nc.close()


def server_killed_with_9(data_dir: Path) -> str:
    """A server that bought ann 70 coins and sent a 5-coin gift, then was killed with -9:
    its redis-server lives on (an orphan, holding the data dir's lock); its URL."""
    first = ServerProcess(data_dir).start()
    try:
        asyncio.run(buy_and_gift(first, "before-kill-9"))
    finally:
        first.kill()
    left = redis_url_of(data_dir)
    assert left.returncode == 0, left.stderr
    return left.stdout.strip()


def no_redis_left(data_dir: Path, url: str) -> bool:
    """Nothing answers at url and no redis-server holds the data dir's lock."""
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    fd = os.open(data_dir / "redis" / "redis.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return not answers_ping(host, int(port))


@contextlib.contextmanager
def shut_down_if_left(url: str) -> Iterator[None]:
    """A failed test leaves no redis-server behind."""
    try:
        yield
    finally:
        client = redis.Redis.from_url(url)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()


async def coins_of_ann(proc: ServerProcess) -> int:
    ann, welcome = await WsClient.login(proc.ws_url, TokenMaker(JWT_SECRET)("ann"))
    await ann.close()
    return int(welcome["coins"])


def test_a_redis_left_by_a_killed_server_is_adopted_by_the_next(tmp_path: Path) -> None:
    """kill -9 of the server leaves its redis-server running: the next server adopts it (no
    second one on the same files, no refusal), finds every balance, and stops it when it
    stops. While that server lives, another one still refuses to start."""
    data_dir = tmp_path / "data"
    url = server_killed_with_9(data_dir)
    with shut_down_if_left(url):
        second = ServerProcess(data_dir).start()
        try:
            assert any(f"redis={url} " in line for line in second.log), second.log
            assert any(
                f"adopted the embedded Redis of {data_dir.resolve() / 'redis'} at {url}" in line
                for line in second.log
            ), second.log
            assert asyncio.run(coins_of_ann(second)) == 65  # 70 bought, a 5-coin gift sent
            assert second.proc is not None
            refused = run_cli(
                "serve", "--data-dir", str(data_dir), "--port", "0", "--admin-port", "0"
            )
            assert refused.returncode == 1
            errors = [line for line in refused.stderr.splitlines() if "error" in line]
            assert len(errors) == 1, refused.stderr
            assert (
                f"another process (pid {second.proc.pid}) already runs "
                f"the embedded Redis of {data_dir.resolve() / 'redis'} at {url}: "
                "stop that process first"
            ) in errors[0]
            assert second.running
        finally:
            assert second.stop() == 0
        assert no_redis_left(data_dir, url)
        assert redis_url_of(data_dir).returncode == 1
    third = ServerProcess(data_dir).start()  # its own redis-server now, on the same files
    try:
        assert not any("adopted" in line for line in third.log), third.log
        assert asyncio.run(coins_of_ann(third)) == 65
    finally:
        assert third.stop() == 0


def test_a_ledger_command_adopts_the_redis_of_a_killed_server(tmp_path: Path) -> None:
    """No server runs the data dir's Redis, a dead one's does: audit adopts it and stops it
    when done, as it would the one it starts; a consumer adopts it, and once the consumer is
    killed with -9 too, the next server adopts it from the consumer."""
    data_dir = tmp_path / "data"
    url = server_killed_with_9(data_dir)
    with shut_down_if_left(url):
        audited = run_cli("audit", "--data-dir", str(data_dir))
        assert audited.returncode == 0 and "audit PASSED" in audited.stdout, audited.stderr
        assert audited.stdout.startswith("2 ledger entries")
        assert no_redis_left(data_dir, url)
    url = server_killed_with_9(data_dir)
    with shut_down_if_left(url):
        consume = WorkerProcess(
            ["consume", "--group", "earnings", "--block-ms", "50", "--data-dir", str(data_dir)]
        )
        try:
            consume.wait_for_log("consumer ready")
            adopted = f"adopted the one a killed process left at {url} for this consume"
            assert consume.said(adopted), consume.log
        finally:
            consume.proc.kill()  # as a crash would: the redis-server lives on again
            consume.proc.wait(10)
        assert redis_url_of(data_dir).stdout.strip() == url
        proc = ServerProcess(data_dir).start()
        try:
            assert any(f"redis={url} " in line for line in proc.log), proc.log
            assert asyncio.run(coins_of_ann(proc)) == 65  # the same receipt and gift key again
        finally:
            assert proc.stop() == 0
        assert no_redis_left(data_dir, url)
