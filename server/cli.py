"""`giftstream serve | token | redis-url | relay | consume | trim | audit`: the command line,
and nothing but turning arguments into settings and a clear one-line error when they are
wrong."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

from giftstream.server.config import (
    ConfigError,
    Settings,
    add_options,
    build_settings,
    given,
    load_or_create_secret,
    redact_url,
    resolve,
)
from giftstream.server.embedded_redis import (
    EmbeddedRedis,
    EmbeddedRedisBusy,
    EmbeddedRedisError,
    running_embedded_url,
)
from giftstream.server.money import keys
from giftstream.server.money.catalog import CatalogError, load_catalog
from giftstream.server.realtime.auth import Role, mint_token
from giftstream.server.workers import ServiceReady, Supervisor, parse_workers

log = logging.getLogger("giftstream")

DEMO_USERS = (
    ("ann", "Ann", Role.VIEWER),
    ("cara", "Cara", Role.CREATOR),
    ("otto", "Otto (ops)", Role.OPS),
)
DEMO_PACKAGE = "coins_17500"
DEFAULT_TRIM_KEEP = 10_000  # entries `giftstream trim` keeps whatever the groups say
CONSUME_NUMBERS = (  # flag, default, lowest, help; as run_consumer's keyword arguments
    ("--batch", 100, 1, "entries per read, acked together"),
    ("--block-ms", 1000, 1, "how long a read waits for new entries"),
    ("--claim-idle-ms", 30_000, 1, "reclaim an entry left pending this long"),
    ("--max-deliveries", 5, 1, "deliveries before a failing entry is dead-lettered"),
)
LEDGER_OPTIONS = ("--data-dir", "--redis-url", "--ledger-key")  # where the ledger is
WORKER_OPTIONS = (*LEDGER_OPTIONS, "--log-level")  # and the long-running ones log
LEDGER_HELPS = {
    "--redis-url": "Redis to use (default: the data dir's embedded redis-server: the "
    "server's while it runs, else one started for this command and stopped when it ends)",
}
BUSY_WAIT_S = 10.0  # how long a command waits for an embedded Redis another one is starting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="giftstream", description="Real-time live-stream gifting server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    add_options(serve)
    serve.add_argument(
        "--demo",
        action="store_true",
        help="print ready-to-paste demo tokens and give the demo viewer coins; lifts the "
        "per-address connection cap unless it is given (load tests run from this machine); "
        "payouts are not held unless --payout-hold-days is given (a local tryout)",
    )
    serve.add_argument(
        "--workers",
        help="processes serving the ports, each on its own core, sharing one Redis "
        "(auto or 0: one per core) (env GIFTSTREAM_WORKERS; default 1)",
    )

    token = commands.add_parser("token", help="print a client token signed with the server secret")
    token.add_argument("--user", required=True, help="user id (the token's sub)")
    token.add_argument("--name", help="display name (default: the user id)")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value)
    token.add_argument("--minor", action="store_true", help="the user is not a verified adult")
    token.add_argument("--ttl", type=int, default=86400, help="seconds until it expires")
    add_options(token, only=("--data-dir", "--jwt-secret", "--jwt-audience", "--jwt-issuer"))

    redis_url = commands.add_parser(
        "redis-url",
        help="print the URL of the data dir's running embedded Redis",
        description="Print the URL of the embedded Redis running in the data dir, e.g. for "
        'redis-cli -u "$(giftstream redis-url)"; its port changes at each start. '
        "Exit 1 when none runs.",
    )
    add_options(redis_url, only=("--data-dir",))

    relay = commands.add_parser("relay", help="forward the ledger to NATS JetStream")
    relay.add_argument(
        "--nats",
        default=os.environ.get("GIFTSTREAM_NATS_URL"),
        help="NATS URL, e.g. nats://127.0.0.1:4222 (env GIFTSTREAM_NATS_URL)",
    )
    relay.add_argument("--stream", default="GIFTSTREAM_LEDGER", help="JetStream stream name")
    relay.add_argument(
        "--subject-prefix", default="giftstream.ledger", help="subjects are PREFIX.<kind>"
    )
    relay.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    relay.add_argument(
        "--status",
        action="store_true",
        help="print the relay's lag and the lease holder (a cluster's: which relay holds which "
        "ledger), and exit",
    )
    relay.add_argument(
        "--lease-ttl-ms",
        type=_at_least(100),
        default=10_000,
        help="the relay lease's TTL: a standby relay takes over this long after the holder "
        "dies (renewed every third of it; on a cluster also the relays' heartbeat expiry)",
    )
    add_options(relay, only=WORKER_OPTIONS, helps=LEDGER_HELPS)

    consume = commands.add_parser(
        "consume", help="run a ledger consumer (a handler in a consumer group) until signalled"
    )
    consume.add_argument(
        "--group", help="consumer group; each group sees every entry (env GIFTSTREAM_GROUP)"
    )
    consume.add_argument(
        "--consumer",
        help="this consumer's name in its group, stable across restarts "
        "(env GIFTSTREAM_CONSUMER; default the host name)",
    )
    consume.add_argument(
        "--handler", help="earnings or checkpoint (env GIFTSTREAM_HANDLER; default earnings)"
    )
    for flag, default, low, what in CONSUME_NUMBERS:
        consume.add_argument(
            flag, type=_at_least(low), default=default, help=f"{what} (default {default})"
        )
    consume.add_argument("--dead-letter-key", help="dead-letter stream (default LEDGER_KEY:dead)")
    consume.add_argument(
        "--metrics-port", type=_at_least(1), help="serve Prometheus metrics on 127.0.0.1:PORT"
    )
    add_options(consume, only=WORKER_OPTIONS, helps=LEDGER_HELPS)

    trim = commands.add_parser(
        "trim", help="trim the ledger below what every consumer group and the checkpoint need"
    )
    trim.add_argument(
        "--keep",
        help="always keep the last KEEP entries, whatever the groups say "
        f"(env GIFTSTREAM_TRIM_KEEP; default {DEFAULT_TRIM_KEEP})",
    )
    add_options(trim, only=LEDGER_OPTIONS, helps=LEDGER_HELPS)

    audit = commands.add_parser("audit", help="replay the ledger and compare every wallet")
    add_options(audit, only=LEDGER_OPTIONS, helps=LEDGER_HELPS)

    from giftstream.loadtest.cli import (
        add_loadtest_parser,  # light: the load generator loads on use
    )

    add_loadtest_parser(commands)
    return parser


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {low}, not {text!r}")
        return value

    return parse


def _flag_or_env(value: str | None, flag: str, env: str, default: str | None) -> tuple[Any, str]:
    """A flag's value if given, else its environment variable's, else the default; with
    the name of where it came from, for error messages."""
    if value is not None:
        return value, flag
    if os.environ.get(env):
        return os.environ[env], env
    return default, flag


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values = resolve(args)
        if args.command == "serve":
            return _serve(args, values)
        if args.command == "token":
            return _token(args, values)
        if args.command == "redis-url":
            return _print_redis_url(values)
        if args.command == "relay":
            return _relay(args, values)
        if args.command == "consume":
            return _consume(args, values)
        if args.command == "trim":
            return _trim(args, values)
        if args.command == "loadtest":
            from giftstream.loadtest.cli import run_loadtest

            return run_loadtest(args, values)
        return _audit(args, values)
    except (ConfigError, CatalogError) as exc:
        print(f"giftstream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _log_at(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace, values: dict[str, Any]) -> int:
    from giftstream.server.app import StartupError, serve_until_signalled

    _log_at(values["log_level"])
    catalog = load_catalog(values.get("catalog"))
    if args.demo and not given(args, "max_connections_per_ip"):
        values["max_connections_per_ip"] = 0  # every load-test socket comes from 127.0.0.1
    settings = build_settings(values)
    if args.demo and not given(args, "payout_hold_days"):
        # A local tryout: its first payout (README) is not held a week. Anything else holds.
        settings = dataclasses.replace(settings, payout_hold_days=0)
    raw, source = _flag_or_env(args.workers, "--workers", "GIFTSTREAM_WORKERS", "1")
    try:
        workers = parse_workers(raw)
    except ValueError as exc:
        raise ConfigError(f"{source} = {raw!r}: {exc}") from exc
    if workers > 1 and settings.broker != "redis":
        # workers share rooms only through Redis: with rooms in each process's memory, a
        # viewer and a sender on two workers would be in two different rooms
        raise ConfigError(f"--workers {workers} needs --broker redis (rooms shared by workers)")
    if workers > 1:
        return _serve_workers(dataclasses.replace(settings, workers=workers), values, args.demo)
    on_ready = _print_demo if args.demo else None
    try:
        uvloop.run(serve_until_signalled(settings, catalog, on_ready))
    except StartupError as exc:
        print(f"giftstream: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_workers(settings: Settings, values: dict[str, Any], demo: bool) -> int:
    """`--workers N`: a supervisor and N server processes on the same ports."""

    def print_demo(service: ServiceReady) -> None:
        embedded = service.redis_url if service.embedded_redis else None
        block = _demo_block(
            settings, service.ws_url, service.admin_url, service.redis_url, embedded
        )
        print(block, flush=True)

    supervisor = Supervisor(
        settings,
        log_level=values["log_level"],
        worker_on_ready=_give_demo_coins if demo else None,
        on_all_ready=print_demo if demo else None,
    )
    return supervisor.run()


async def _print_demo(app: Any) -> None:
    """Coins for the demo viewer, then the block that says how to use the server."""
    await _give_demo_coins(app)
    embedded = app.redis_url if app.embedded_redis is not None else None
    print(_demo_block(app.settings, app.ws_url, app.admin_url, app.redis_url, embedded), flush=True)


async def _give_demo_coins(app: Any) -> None:
    """The demo viewer's coins: once per data dir (a fixed receipt), however often called."""
    package = app.catalog.packages.get(DEMO_PACKAGE) or next(iter(app.catalog.packages.values()))
    await app.wallet.purchase(receipt="demo-welcome-ann", user="ann", package=package, adult=True)


def _demo_block(
    settings: Settings, ws_url: str, admin_url: str, redis_url: str, embedded: str | None
) -> str:
    """Tokens for a viewer, a creator and an ops user, and how to reach the server, its
    Redis and its ledger, in commands that paste as they are."""
    command = _invoked_as()
    data_dir = "" if settings.data_dir == Path("data") else f" --data-dir {settings.data_dir}"
    ledger = "" if settings.ledger_key == keys.LEDGER else f" --ledger-key {settings.ledger_key}"
    if embedded is not None:
        redis = f"{embedded} (embedded; its port changes at each start: "
        redis += f"`{command} redis-url{data_dir}` prints it)"
        stops = "the server and its Redis"
    else:
        redis, stops = f"{redact_url(redis_url)} (--redis-url)", "the server"
    lines = [
        "",
        f"  giftstream is running. WebSocket: {ws_url}   admin API: {admin_url}",
        f"  Redis: {redis}",
        f"  Ledger: {settings.ledger_key}   check it: `{command} audit{data_dir}{ledger}`",
        f"  Demo tokens (valid 24 h; `{command} token --help` makes more):",
    ]
    tokens: dict[str, str] = {}
    for user, name, role in DEMO_USERS:
        token = mint_token(
            settings.jwt_secret,
            user,
            name=name,
            role=role,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
        tokens[user] = token
        lines.append(f"    {role.value:8} {user:5} {token}")
    pages = ws_url.replace("ws://", "http://", 1).removesuffix("/ws")
    lines += [
        "  Pages (open in a browser; the token stays in the #fragment):",
        f"    viewer (ann):  {pages}/?room=cara#token={tokens['ann']}",
        f"    creator (cara, press Go live):  {pages}/?room=cara#token={tokens['cara']}",
        f"    ops dashboard: {pages}/ops#token={tokens['otto']}",
    ]
    lines += [
        f"  Connect (e.g. `{_python_beside(command)} -m websockets {ws_url}`) and send:",
        '    {"type":"hello","token":"<token>"}',
        '    creator: {"type":"go_live","title":"Hello"}   viewer: {"type":"join","room":"cara"}',
        '    viewer:  {"type":"gift","room":"cara","gift":"heart","count":2,"key":"first-heart"}',
        f"  Ctrl-C stops {stops}.",
        "",
    ]
    return "\n".join(lines)


def _invoked_as() -> str:
    """This command as the operator can type it again: `giftstream` when that is the one on
    PATH, else its path (`.venv/bin/giftstream` after `make run`)."""
    script = Path(sys.argv[0])
    if script.name != "giftstream":  # python -m giftstream.server.cli
        return "giftstream"
    on_path = shutil.which("giftstream")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "giftstream"
    with contextlib.suppress(ValueError):
        return str(script.resolve().relative_to(Path.cwd().resolve()))
    return str(script)


def _python_beside(command: str) -> str:
    """The Python that has giftstream's packages (websockets among them), as typed: the
    venv's beside `.venv/bin/giftstream`, else `python3`."""
    return str(Path(command).with_name("python")) if "/" in command else "python3"


def _token(args: argparse.Namespace, values: dict[str, Any]) -> int:
    data_dir: Path = values["data_dir"]
    secret = values.get("jwt_secret") or load_or_create_secret(data_dir, "jwt_secret")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    try:
        token = mint_token(
            secret,
            args.user,
            name=args.name,
            role=Role(args.role),
            adult=not args.minor,
            ttl_s=args.ttl,
            audience=values.get("jwt_audience"),
            issuer=values.get("jwt_issuer"),
        )
    except ValueError as exc:
        raise ConfigError(f"--user: {exc}") from exc
    print(token)
    return 0


def _print_redis_url(values: dict[str, Any]) -> int:
    """The running embedded Redis's URL on stdout (nothing else, for $(...)); else exit 1."""
    redis_dir = values["data_dir"] / "redis"
    url = running_embedded_url(redis_dir)
    if url is None:
        serve = f"{_invoked_as()} serve"
        print(
            f"giftstream: no embedded Redis running in {redis_dir} (`{serve}` starts it)",
            file=sys.stderr,
        )
        return 1
    print(url)
    return 0


@contextlib.contextmanager
def _ledger_redis(values: dict[str, Any], worker: str | None = None) -> Iterator[str]:
    """--redis-url; else the data dir's embedded Redis: the server's while it runs, else one
    started (or adopted from a killed server) for this command and stopped when it ends (a
    long-running `worker` says so)."""
    url: str | None = values.get("redis_url")
    if url is not None:
        yield url
        return
    redis_dir: Path = values["data_dir"] / "redis"
    if not redis_dir.is_dir():
        raise ConfigError(
            f"no --redis-url, and no embedded Redis data in {redis_dir} "
            f"(`{_invoked_as()} serve` makes it)"
        )
    embedded = _own_embedded_redis(redis_dir)
    if isinstance(embedded, str):  # a live server (or command) runs it: use that one
        yield embedded
        return
    if worker is not None:
        how = "adopted the one a killed process left" if embedded.adopted else "started it"
        log.warning(
            "no server runs the embedded Redis of %s: %s at %s for this %s; it stops when the "
            "%s does, and `giftstream serve` of this data dir cannot start until then",
            redis_dir,
            how,
            embedded.url,
            worker,
            worker,
        )
    try:
        yield embedded.url
    finally:
        embedded.stop()


def _own_embedded_redis(redis_dir: Path) -> EmbeddedRedis | str:
    """The data dir's embedded Redis, started or adopted by us; else the URL of the one its
    live owner runs (waiting while that owner starts it)."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            return EmbeddedRedis(redis_dir).start()
        except EmbeddedRedisBusy as exc:
            if (running := running_embedded_url(redis_dir)) is not None:
                return running
            if time.monotonic() > deadline:
                raise ConfigError(str(exc)) from exc
            time.sleep(0.1)
        except EmbeddedRedisError as exc:
            raise ConfigError(f"embedded Redis: {exc}") from exc


def _relay(args: argparse.Namespace, values: dict[str, Any]) -> int:
    from giftstream.server.ledger.relay.config import RelayConfig
    from giftstream.server.ledger.relay.status import read_status
    from giftstream.server.ledger.relay.worker import run_relay

    _log_at(values["log_level"])
    ledger_key = values["ledger_key"]  # a cluster's ledgers are named after it, one relay each
    if args.status:
        with _ledger_redis(values) as url:
            status = uvloop.run(read_status(url, ledger_key))
        if status is None:
            return 1
        print(orjson.dumps(status).decode())
        return 0
    if not args.nats:
        raise ConfigError("--nats / GIFTSTREAM_NATS_URL is required, e.g. nats://127.0.0.1:4222")
    config = RelayConfig(
        nats_url=args.nats,
        ledger_key=ledger_key,
        stream=args.stream,
        subject_prefix=args.subject_prefix,
        lease_ttl_ms=args.lease_ttl_ms,
    )
    with _ledger_redis(values, "relay") as url:
        return uvloop.run(run_relay(url, config, args.metrics_port))


def _consume(args: argparse.Namespace, values: dict[str, Any]) -> int:
    from giftstream.server.ledger.consumer import HANDLERS, run_consumer
    from giftstream.server.ledger.relay.config import GROUP as RELAY_GROUP

    group, group_from = _flag_or_env(args.group, "--group", "GIFTSTREAM_GROUP", None)
    if not group:
        raise ConfigError("--group / GIFTSTREAM_GROUP is required, e.g. --group earnings")
    if group == RELAY_GROUP:
        raise ConfigError(
            f"{group_from} {group!r}: that group is the JetStream relay's; consuming in it "
            "would ack entries the relay never published"
        )
    consumer, _ = _flag_or_env(
        args.consumer, "--consumer", "GIFTSTREAM_CONSUMER", socket.gethostname()
    )
    handler, handler_from = _flag_or_env(
        args.handler, "--handler", "GIFTSTREAM_HANDLER", "earnings"
    )
    if handler not in HANDLERS:
        raise ConfigError(
            f"{handler_from} {handler!r}: no such handler; one of " + ", ".join(sorted(HANDLERS))
        )
    _log_at(values["log_level"])
    with _ledger_redis(values, "consume") as url:
        consumer_run = run_consumer(
            url,
            group,
            consumer,
            handler,
            ledger_key=values["ledger_key"],
            dead_letter_key=args.dead_letter_key,
            batch=args.batch,
            block_ms=args.block_ms,
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            metrics_port=args.metrics_port,
        )
        return uvloop.run(consumer_run)


def _trim(args: argparse.Namespace, values: dict[str, Any]) -> int:
    raw, source = _flag_or_env(args.keep, "--keep", "GIFTSTREAM_TRIM_KEEP", None)
    keep = DEFAULT_TRIM_KEEP
    if raw is not None:
        try:
            keep = _at_least(0)(raw)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    with _ledger_redis(values) as url:
        return uvloop.run(_run_trim(url, values["ledger_key"], keep))


async def _run_trim(url: str, ledger_key: str, keep: int) -> int:
    from redis.exceptions import RedisError

    from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis
    from giftstream.server.ledger.trim import trim_all

    try:
        client, keyspace = await open_ledger_redis(url, ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        print(
            f"giftstream: error: cannot trim in Redis at {redact_url(url)}: {exc}", file=sys.stderr
        )
        return 1
    try:
        done = await trim_all(client, keyspace, keep_min_entries=keep)
    except (RedisError, OSError) as exc:
        where = redact_url(url)
        print(f"giftstream: error: cannot trim in Redis at {where}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    for ledger_key, trimmed in done.items():
        print(trimmed.summary(ledger_key))
    return 0


def _audit(args: argparse.Namespace, values: dict[str, Any]) -> int:
    with _ledger_redis(values) as url:
        return uvloop.run(_run_audit(url, values["ledger_key"]))


async def _run_audit(url: str, ledger_key: str) -> int:
    from redis.exceptions import RedisError

    from giftstream.server.ledger.audit import audit
    from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis

    try:
        client, keyspace = await open_ledger_redis(url, ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        print(f"giftstream: error: cannot audit Redis at {redact_url(url)}: {exc}", file=sys.stderr)
        return 2
    try:
        report = await audit(client, keyspace=keyspace)
    except (RedisError, OSError) as exc:
        where = redact_url(url)
        print(f"giftstream: error: cannot audit Redis at {where}: {exc}", file=sys.stderr)
        return 2
    finally:
        await client.aclose()
    print(report.summary())
    for breach in report.breaches:
        print(f"BREACH: {breach}")
    print("audit PASSED" if report.ok else f"audit FAILED: {len(report.breaches)} breaches")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
