"""`giftstream serve | token | relay | consume | trim | audit`: the command line, and nothing
but turning arguments into settings and a clear one-line error when they are wrong."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

from giftstream.server.config import (
    ConfigError,
    Settings,
    add_options,
    build_settings,
    load_or_create_secret,
    resolve,
)
from giftstream.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError, running_embedded_url
from giftstream.server.money.catalog import CatalogError, load_catalog
from giftstream.server.realtime.auth import Role, mint_token

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
        help="print ready-to-paste demo tokens and give the demo viewer coins",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("GIFTSTREAM_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )

    token = commands.add_parser("token", help="print a client token signed with the server secret")
    token.add_argument("--user", required=True, help="user id (the token's sub)")
    token.add_argument("--name", help="display name (default: the user id)")
    token.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value)
    token.add_argument("--minor", action="store_true", help="the user is not a verified adult")
    token.add_argument("--ttl", type=int, default=86400, help="seconds until it expires")
    add_options(token, only=("--data-dir", "--jwt-secret"))

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
        "--status", action="store_true", help="print the relay's lag and the lease holder, and exit"
    )
    relay.add_argument(
        "--lease-ttl-ms",
        type=_at_least(100),
        default=10_000,
        help="the relay lease's TTL: a standby relay takes over this long after the holder "
        "dies (renewed every third of it)",
    )
    relay.add_argument("--ledger-key", default="giftstream:ledger")
    relay.add_argument(
        "--log-level",
        default=os.environ.get("GIFTSTREAM_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    add_options(relay, only=("--data-dir", "--redis-url"))

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
    consume.add_argument("--ledger-key", default="giftstream:ledger")
    consume.add_argument(
        "--log-level",
        default=os.environ.get("GIFTSTREAM_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    add_options(consume, only=("--data-dir", "--redis-url"))

    trim = commands.add_parser(
        "trim", help="trim the ledger below what every consumer group and the checkpoint need"
    )
    trim.add_argument(
        "--keep",
        help="always keep the last KEEP entries, whatever the groups say "
        f"(env GIFTSTREAM_TRIM_KEEP; default {DEFAULT_TRIM_KEEP})",
    )
    trim.add_argument("--ledger-key", default="giftstream:ledger")
    add_options(trim, only=("--data-dir", "--redis-url"))

    audit = commands.add_parser("audit", help="replay the ledger and compare every wallet")
    add_options(audit, only=("--data-dir", "--redis-url"))
    audit.add_argument("--ledger-key", default="giftstream:ledger")

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


def _serve(args: argparse.Namespace, values: dict[str, Any]) -> int:
    from giftstream.server.app import StartupError, serve_until_signalled

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    catalog = load_catalog(values.get("catalog"))
    settings = build_settings(values)
    on_ready = _print_demo if args.demo else None
    try:
        uvloop.run(serve_until_signalled(settings, catalog, on_ready))
    except StartupError as exc:
        print(f"giftstream: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _print_demo(app: Any) -> None:
    """Tokens for a viewer, a creator and an ops user, and coins for the viewer."""
    from giftstream.server.realtime.session import now_ms

    settings: Settings = app.settings
    package = app.catalog.packages.get(DEMO_PACKAGE) or next(iter(app.catalog.packages.values()))
    await app.wallet.purchase(
        receipt="demo-welcome-ann", user="ann", package=package, adult=True, now_ms=now_ms()
    )
    lines = [
        "",
        f"  giftstream is running. WebSocket: {app.ws_url}   admin API: {app.admin_url}",
        "  Demo tokens (valid 24 h; `giftstream token --help` makes more):",
    ]
    for user, name, role in DEMO_USERS:
        token = mint_token(settings.jwt_secret, user, name=name, role=role)
        lines.append(f"    {role.value:8} {user:5} {token}")
    lines += [
        "  Connect (e.g. `python -m websockets " + app.ws_url + "`) and send:",
        '    {"type":"hello","token":"<token>"}',
        '    creator: {"type":"go_live","title":"Hello"}   viewer: {"type":"join","room":"cara"}',
        '    viewer:  {"type":"gift","room":"cara","gift":"rose","count":1,"key":"my-first-rose"}',
        "  Ctrl-C stops the server and its Redis.",
        "",
    ]
    print("\n".join(lines), flush=True)


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
        )
    except ValueError as exc:
        raise ConfigError(f"--user: {exc}") from exc
    print(token)
    return 0


def _running_redis(values: dict[str, Any]) -> str:
    """--redis-url, else the data dir's embedded Redis if it runs (a relay, consumer or trim
    never starts one: the server owns it)."""
    url = values.get("redis_url") or running_embedded_url(values["data_dir"] / "redis")
    if url is None:
        raise ConfigError("no --redis-url, and no embedded Redis running in the data dir")
    return str(url)


def _relay(args: argparse.Namespace, values: dict[str, Any]) -> int:
    from giftstream.server.ledger.relay.config import RelayConfig
    from giftstream.server.ledger.relay.status import read_status
    from giftstream.server.ledger.relay.worker import run_relay

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = _running_redis(values)
    if args.status:
        status = uvloop.run(read_status(url, args.ledger_key))
        if status is None:
            return 1
        print(orjson.dumps(status).decode())
        return 0
    if not args.nats:
        raise ConfigError("--nats / GIFTSTREAM_NATS_URL is required, e.g. nats://127.0.0.1:4222")
    config = RelayConfig(
        nats_url=args.nats,
        ledger_key=args.ledger_key,
        stream=args.stream,
        subject_prefix=args.subject_prefix,
        lease_ttl_ms=args.lease_ttl_ms,
    )
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
    url = _running_redis(values)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    consumer_run = run_consumer(
        url,
        group,
        consumer,
        handler,
        ledger_key=args.ledger_key,
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
    return uvloop.run(_run_trim(_running_redis(values), args.ledger_key, keep))


async def _run_trim(url: str, ledger_key: str, keep: int) -> int:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from giftstream.server.ledger.trim import trim

    client = aioredis.Redis.from_url(url)
    try:
        done = await trim(client, ledger_key, keep_min_entries=keep)
    except (RedisError, OSError) as exc:
        from giftstream.server.ledger.runtime import redact_url

        where = redact_url(url)
        print(f"giftstream: error: cannot trim in Redis at {where}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.aclose()
    print(done.summary(ledger_key))
    return 0


def _audit(args: argparse.Namespace, values: dict[str, Any]) -> int:
    """Audit the configured Redis; with none configured, the embedded one of the data dir
    (the running server's, or started just for the audit when the server is down)."""
    url = values.get("redis_url")
    if url is not None:
        return uvloop.run(_run_audit(url, args.ledger_key))
    redis_dir = values["data_dir"] / "redis"
    running = running_embedded_url(redis_dir)
    if running is not None:
        return uvloop.run(_run_audit(running, args.ledger_key))
    if not redis_dir.is_dir():
        raise ConfigError(f"no Redis configured and no embedded Redis data in {redis_dir}")
    try:
        with EmbeddedRedis(redis_dir) as embedded:
            return uvloop.run(_run_audit(embedded.url, args.ledger_key))
    except EmbeddedRedisError as exc:
        raise ConfigError(str(exc)) from exc


async def _run_audit(url: str, ledger_key: str) -> int:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from giftstream.server.ledger.audit import audit
    from giftstream.server.ledger.runtime import redact_url

    client = aioredis.Redis.from_url(url)
    try:
        report = await audit(client, ledger_key=ledger_key)
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
