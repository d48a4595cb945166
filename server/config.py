"""Every setting of the server, read once at start from flags and environment and validated.

A flag wins over its environment variable, which wins over the default. A bad value fails
start-up with a `ConfigError` that names the option, never later at the first request.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit

from giftstream.server.money import keys
from giftstream.server.money.wallet import (
    DEFAULT_PAYOUT_DAILY_CAP,
    DEFAULT_PAYOUT_HOLD_DAYS,
    MAX_PAYOUT_DAILY_CAP,
    MAX_PAYOUT_HOLD_DAYS,
)
from giftstream.server.realtime.auth import DEFAULT_LEEWAY_S

# Query parameters that hold a secret in a Redis or NATS URL.
SECRET_QUERY = frozenset({"password", "pass", "token", "auth_token", "nkey", "jwt"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the flag and the variable."""


# Connection caps (docs/operations.md says why these numbers). Descriptors the process keeps
# for other things than client sockets: the Redis pool, the admin API's clients, listening
# sockets, log and catalog files.
FD_RESERVE = 256
DEFAULT_MAX_CONNECTIONS_PER_IP = 2000  # a carrier-grade NAT puts hundreds to 1000+ behind one
DEFAULT_MAX_CONNECTIONS_PER_USER = 8  # a viewer on a phone, a tablet and a few browser tabs
DEFAULT_ROOM_IDLE_S = 300.0
BROKERS = ("redis", "memory")


def default_max_connections() -> int:
    """What the process can hold: its open-file soft limit less the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - FD_RESERVE)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection and per-room bounds; defaults suit a phone client on a real network."""

    hello_timeout_s: float = 10.0
    messages_per_s: float = 30.0  # sustained request rate per connection
    messages_burst: int = 60
    gifts_per_s: float = 20.0  # sustained gift rate per connection
    gifts_burst: int = 40
    # sustained gift rate per user, shared by all their connections on this node: what a
    # user can make Redis run (a refused gift costs a script too), whatever their sockets
    user_gifts_per_s: float = 20.0
    user_gifts_burst: int = 40
    # `join` with `since` per connection: each replay can be as large as a room's history
    replays_per_s: float = 0.1
    replays_burst: int = 3
    flood_strikes: int = 20  # refused/bad frames allowed in a burst before 4429
    flood_strikes_per_s: float = 2.0  # how fast strikes are forgiven
    max_backlog_bytes: int = 1 << 20  # unsent bytes a connection may hold; past it, 4008
    # the kernel's send buffer per connection (SO_SNDBUF; Linux doubles it): left to
    # autotuning it grows to megabytes that a client that never reads holds beside the backlog
    send_buffer_bytes: int = 64 * 1024
    history_size: int = 1024  # room events kept for `since` (and in each room's log)
    tick_s: float = 0.02  # fan-out batching window
    viewers_interval_s: float = 1.0
    stats_interval_s: float = 1.0  # also how often this gateway writes its heartbeat
    gateway_expiry_s: float = 15.0  # a gateway whose heartbeat is older is gone from the stats
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    close_timeout_s: float = 5.0  # a peer that does not answer our close frame is cut off
    shutdown_grace_s: float = 10.0
    # sockets held at once, from accept to close (hello or not); past it, HTTP 503
    max_connections: int = field(default_factory=default_max_connections)
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP  # past it, 429; 0: no cap
    max_connections_per_user: int = DEFAULT_MAX_CONNECTIONS_PER_USER  # past it, 4429; 0: none
    # the Redis broker: this gateway's viewers per room are rewritten this often and expire
    # after the ttl (a killed gateway's viewers leave the counts within it)
    presence_refresh_s: float = 5.0
    presence_ttl_s: float = 15.0
    creator_seen_s: float = 5.0  # a connected creator's room is marked seen this often
    room_idle_s: float = DEFAULT_ROOM_IDLE_S  # a room whose creator is away this long ends
    unfollow_after_s: float = 5.0  # a room no one here views or watches is let go after it


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    admin_port: int = 8766
    admin_host: str = "127.0.0.1"  # the internal API's own: --host 0.0.0.0 must not open it
    redis_url: str | None = None  # None: start the embedded Redis
    data_dir: Path = Path("data")
    jwt_secret: str = ""
    jwt_leeway_s: float = DEFAULT_LEEWAY_S  # clock skew allowed on exp, nbf and iat
    jwt_audience: str | None = None  # when set, a token's `aud` must name it
    jwt_issuer: str | None = None  # when set, a token's `iss` must be it
    webhook_secret: str = ""
    webhook_secret_previous: str | None = None  # also accepted, during a rotation
    catalog: Path | None = None  # None: the bundled demo catalog
    allowed_origins: tuple[str, ...] | None = None  # None: any origin
    ledger_key: str = keys.LEDGER  # the stream every money movement is appended to
    redis_pool_size: int = 64  # concurrent Redis calls; more wait for a free connection
    partitions: int = keys.DEFAULT_PARTITIONS  # a Redis Cluster's partitions (one Redis: 1)
    payout_hold_days: int = DEFAULT_PAYOUT_HOLD_DAYS  # diamonds wait this long to be payable
    payout_daily_cap: int = DEFAULT_PAYOUT_DAILY_CAP  # diamonds paid out per creator a UTC day
    workers: int = 1  # processes serving the ports (`serve --workers`; server/workers.py)
    # where rooms live: "redis" (every gateway on the Redis serves every room) or "memory"
    # (this process alone; one gateway)
    broker: str = "redis"
    limits: Limits = field(default_factory=Limits)
    # --durable-ack: gift_ok only once the gift survives a crash (a cluster's replicas hold it,
    # or one Redis's AOF is fsynced); off, a master's last acked gifts may be lost (async copies)
    durable_ack: bool = False
    crediting: bool = True  # a Redis Cluster: run a crediting runner here (crediting.py)


@dataclass(frozen=True, slots=True)
class Option:
    """One option of `serve` (and of the commands that share it): its flag, environment
    variable, default and parser."""

    flag: str
    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    switch: bool = False  # a flag without a value (`--durable-ack`); its variable takes 1/0

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return port


def _redis_url(text: str) -> str:
    if urlparse(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return text


def _secret(text: str) -> str:
    if len(text) < 16:
        raise ValueError("must be at least 16 characters")
    return text


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    for origin in origins:
        if urlparse(origin).scheme not in ("http", "https") or not urlparse(origin).netloc:
            raise ValueError(f"{origin!r} is not an origin like https://example.com")
    return origins


def _rate(text: str) -> float:
    rate = float(text)
    if not 0 < rate <= 100_000:
        raise ValueError("must be a rate per second above 0 and at most 100000")
    return rate


def _hold_days(text: str) -> int:
    days = int(text)
    if not 0 <= days <= MAX_PAYOUT_HOLD_DAYS:
        raise ValueError(f"must be whole days from 0 to {MAX_PAYOUT_HOLD_DAYS}")
    return days


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0 (true/false, yes/no, on/off)")


def _partitions(text: str) -> int:
    count = int(text)
    if not 1 <= count <= keys.MAX_PARTITIONS:
        raise ValueError(f"must be a whole number from 1 to {keys.MAX_PARTITIONS}")
    return count


def _daily_cap(text: str) -> int:
    cap = int(text)
    if not 1 <= cap <= MAX_PAYOUT_DAILY_CAP:
        raise ValueError(f"must be diamonds from 1 to {MAX_PAYOUT_DAILY_CAP}")
    return cap


def _leeway(text: str) -> float:
    seconds = float(text)
    if not 0 <= seconds <= 600:
        raise ValueError("must be a number of seconds from 0 to 600")
    return seconds


def _claim(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def _cap(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        count = int(text)
        if not low <= count <= 10_000_000:
            raise ValueError(f"must be a whole number from {low} to 10000000")
        return count

    return parse


def _ledger_key(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be a Redis key without spaces, e.g. giftstream:ledger")
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(LOG_LEVELS))
    return text.upper()


def _broker(text: str) -> str:
    if text not in BROKERS:
        raise ValueError("must be one of " + ", ".join(BROKERS))
    return text


def _idle_s(text: str) -> float:
    seconds = float(text)
    if not 1 <= seconds <= 7 * 86400:
        raise ValueError("must be a number of seconds from 1 to 604800")
    return seconds


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


# Every option of `serve`; the other commands add those they share with it (server/cli.py).
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("--host", "GIFTSTREAM_HOST", "127.0.0.1", str, "address to listen on"),
    Option("--port", "GIFTSTREAM_PORT", "8765", _port, "WebSocket port (plus public GET pages)"),
    Option("--admin-port", "GIFTSTREAM_ADMIN_PORT", "8766", _port, "internal HTTP API port"),
    Option(
        "--admin-host",
        "GIFTSTREAM_ADMIN_HOST",
        "127.0.0.1",
        str,
        "address the internal HTTP API listens on (its own: --host does not open it)",
    ),
    Option(
        "--redis-url",
        "GIFTSTREAM_REDIS_URL",
        None,
        _redis_url,
        "Redis to use (default: an embedded redis-server in the data dir, started and stopped "
        "with the server)",
    ),
    Option(
        "--data-dir",
        "GIFTSTREAM_DATA_DIR",
        "./data",
        Path,
        "embedded Redis files and generated secrets",
    ),
    Option(
        "--ledger-key",
        "GIFTSTREAM_LEDGER_KEY",
        keys.LEDGER,
        _ledger_key,
        "the ledger stream: the server appends every money movement to it, and consume, "
        "relay, trim and audit read it; give them all the same one",
    ),
    Option(
        "--log-level",
        "GIFTSTREAM_LOG_LEVEL",
        "INFO",
        _log_level,
        "logging: " + ", ".join(LOG_LEVELS),
    ),
    Option(
        "--jwt-secret",
        "GIFTSTREAM_JWT_SECRET",
        None,
        _secret,
        "HS256 secret for client tokens (default: generated once into the data dir)",
    ),
    Option(
        "--jwt-leeway",
        "GIFTSTREAM_JWT_LEEWAY",
        f"{DEFAULT_LEEWAY_S:g}",
        _leeway,
        "seconds of clock skew allowed on a token's exp, nbf and iat",
    ),
    Option(
        "--jwt-audience",
        "GIFTSTREAM_JWT_AUDIENCE",
        None,
        _claim,
        "the aud every token must name (default: none; a token naming one is refused)",
    ),
    Option(
        "--jwt-issuer",
        "GIFTSTREAM_JWT_ISSUER",
        None,
        _claim,
        "the iss every token must carry (default: not checked)",
    ),
    Option(
        "--webhook-secret",
        "GIFTSTREAM_WEBHOOK_SECRET",
        None,
        _secret,
        "HMAC secret of the internal API (default: generated once into the data dir)",
    ),
    Option(
        "--webhook-secret-previous",
        "GIFTSTREAM_WEBHOOK_SECRET_PREVIOUS",
        None,
        _secret,
        "the webhook secret being replaced, also accepted while callers move to the new one "
        "(default: unset)",
    ),
    Option(
        "--catalog",
        "GIFTSTREAM_CATALOG",
        None,
        _existing_file,
        "gift catalog TOML (default: the bundled demo catalog)",
    ),
    Option(
        "--allowed-origins",
        "GIFTSTREAM_ALLOWED_ORIGINS",
        None,
        _origins,
        "comma-separated Origin allow-list (default: any origin, with a warning)",
    ),
    Option(
        "--broker",
        "GIFTSTREAM_BROKER",
        "redis",
        _broker,
        "where rooms live: redis (every gateway on the same Redis serves every room) or "
        "memory (this process only: one gateway)",
    ),
    Option(
        "--room-idle-s",
        "GIFTSTREAM_ROOM_IDLE_S",
        f"{DEFAULT_ROOM_IDLE_S:g}",
        _idle_s,
        "a live room whose creator has not been connected for this many seconds is ended "
        "(redis broker)",
    ),
    Option(
        "--gifts-per-s",
        "GIFTSTREAM_GIFTS_PER_S",
        "20",
        _rate,
        "sustained gifts per second one connection may send (bursts of twice that)",
    ),
    Option(
        "--user-gifts-per-s",
        "GIFTSTREAM_USER_GIFTS_PER_S",
        "20",
        _rate,
        "sustained gifts per second one user may send over all their connections to this "
        "node, refused ones included (bursts of twice that)",
    ),
    Option(
        "--messages-per-s",
        "GIFTSTREAM_MESSAGES_PER_S",
        "30",
        _rate,
        "sustained messages per second one connection may send (bursts of twice that)",
    ),
    Option(
        "--payout-hold-days",
        "GIFTSTREAM_PAYOUT_HOLD_DAYS",
        str(DEFAULT_PAYOUT_HOLD_DAYS),
        _hold_days,
        "diamonds a gift credits become payable at the start of the UTC day this many days "
        "after the gift's day plus one (0: at once); a chargeback's window",
    ),
    Option(
        "--partitions",
        "GIFTSTREAM_PARTITIONS",
        str(keys.DEFAULT_PARTITIONS),
        _partitions,
        "on a Redis Cluster: how many partitions wallets and ledgers are spread over, fixed "
        "when its data is created (a later start with another count refuses); one Redis "
        "always has one",
    ),
    Option(
        "--durable-ack",
        "GIFTSTREAM_DURABLE_ACK",
        "0",
        _switch,
        "answer a gift (purchase, refund, payout) only once it survives a crash: on a Redis "
        "Cluster once its shard's replicas hold it (WAIT), on one Redis once its AOF is "
        "fsynced (WAITAOF; refused at start when appendonly is off). Costs latency; off by "
        "default",
        switch=True,
    ),
    Option(
        "--crediting",
        "GIFTSTREAM_CREDITING",
        "on",
        _switch,
        "on a Redis Cluster: whether this server runs a crediting runner, which credits each "
        "gift's diamonds in its creator's partition (any runner credits any gift, once). "
        "'off' on all but a few servers of a large service saves their reads; never on all",
    ),
    Option(
        "--payout-daily-cap",
        "GIFTSTREAM_PAYOUT_DAILY_CAP",
        str(DEFAULT_PAYOUT_DAILY_CAP),
        _daily_cap,
        "diamonds one creator may be paid out per UTC day",
    ),
    Option(
        "--max-connections",
        "GIFTSTREAM_MAX_CONNECTIONS",
        None,
        _cap(1),
        "sockets held at once, from accept to close; past it upgrades get HTTP 503 "
        f"(default: the open-file limit, ulimit -n, less {FD_RESERVE})",
    ),
    Option(
        "--max-connections-per-ip",
        "GIFTSTREAM_MAX_CONNECTIONS_PER_IP",
        str(DEFAULT_MAX_CONNECTIONS_PER_IP),
        _cap(0),
        "sockets one client address may hold; past it upgrades get HTTP 429 (0: no cap, "
        "e.g. behind a proxy, where every client has the proxy's address)",
    ),
    Option(
        "--max-connections-per-user",
        "GIFTSTREAM_MAX_CONNECTIONS_PER_USER",
        str(DEFAULT_MAX_CONNECTIONS_PER_USER),
        _cap(0),
        "connections one user may have; the hello past it is closed 4429 (0: no cap)",
    ),
)


def add_options(
    parser: argparse.ArgumentParser,
    only: tuple[str, ...] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add the options (all, or those named in `only`) to a sub-command's parser; `helps`
    replaces an option's help where that command uses it differently."""
    for opt in SERVE_OPTIONS:
        if only is None or opt.flag in only:
            what = (helps or {}).get(opt.flag, opt.help)
            where = f"env {opt.env}" + (f"; default {opt.default}" if opt.default else "")
            if opt.switch:
                parser.add_argument(
                    opt.flag,
                    dest=opt.dest,
                    action="store_const",
                    const="1",
                    default=None,
                    help=f"{what} ({where})",
                )
            else:
                parser.add_argument(opt.flag, dest=opt.dest, default=None, help=f"{what} ({where})")


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each option's value: the flag if given, else its variable, else its default, parsed."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in SERVE_OPTIONS:
        if not hasattr(args, opt.dest):
            continue
        raw = getattr(args, opt.dest)
        source = opt.flag
        if raw is None and env.get(opt.env):
            raw, source = env[opt.env], opt.env
        if raw is None:
            raw, source = opt.default, "default"
        if raw is None:
            values[opt.dest] = None
            continue
        try:
            values[opt.dest] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{opt.flag} / {opt.env} = {raw!r} ({source}): {exc}") from exc
    return values


def given(args: argparse.Namespace, dest: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether option `dest` was set by its flag or its variable (not left to its default):
    for a command whose own settings file sits between the two."""
    env = os.environ if env is None else env
    opt = next(opt for opt in SERVE_OPTIONS if opt.dest == dest)
    return getattr(args, dest, None) is not None or bool(env.get(opt.env))


def load_or_create_secret(data_dir: Path, name: str) -> str:
    """A secret kept in the data dir, created on first use, readable by its owner only."""
    path = data_dir / name
    try:
        secret = path.read_text(encoding="utf-8").strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        secret = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secret + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    return secret


def build_settings(values: Mapping[str, Any], limits: Limits | None = None) -> Settings:
    """Settings from resolved option values, generating secrets the user did not give."""
    data_dir: Path = values.get("data_dir") or Path("data")
    jwt_secret = values.get("jwt_secret") or load_or_create_secret(data_dir, "jwt_secret")
    webhook_secret = values.get("webhook_secret") or load_or_create_secret(
        data_dir, "webhook_secret"
    )
    limits = limits or Limits()
    # a flag or variable given: a rate, and bursts of twice it; a connection cap
    changed: dict[str, Any] = {}
    for name in ("gifts", "user_gifts", "messages"):
        rate = values.get(f"{name}_per_s")
        if rate is not None:
            changed[f"{name}_per_s"], changed[f"{name}_burst"] = rate, int(2 * rate)
    for name in (
        "max_connections",
        "max_connections_per_ip",
        "max_connections_per_user",
        "room_idle_s",
    ):
        if values.get(name) is not None:
            changed[name] = values[name]
    return Settings(
        host=values.get("host") or "127.0.0.1",
        port=values.get("port", 8765) if values.get("port") is not None else 8765,
        admin_port=values["admin_port"] if values.get("admin_port") is not None else 8766,
        admin_host=values.get("admin_host") or "127.0.0.1",
        redis_url=values.get("redis_url"),
        data_dir=data_dir,
        jwt_secret=jwt_secret,
        jwt_leeway_s=values["jwt_leeway"]
        if values.get("jwt_leeway") is not None
        else DEFAULT_LEEWAY_S,
        jwt_audience=values.get("jwt_audience"),
        jwt_issuer=values.get("jwt_issuer"),
        webhook_secret=webhook_secret,
        webhook_secret_previous=values.get("webhook_secret_previous"),
        catalog=values.get("catalog"),
        allowed_origins=values.get("allowed_origins"),
        ledger_key=values.get("ledger_key") or keys.LEDGER,
        partitions=_given_or(values, "partitions", keys.DEFAULT_PARTITIONS),
        payout_hold_days=_given_or(values, "payout_hold_days", DEFAULT_PAYOUT_HOLD_DAYS),
        payout_daily_cap=_given_or(values, "payout_daily_cap", DEFAULT_PAYOUT_DAILY_CAP),
        broker=values.get("broker") or "redis",
        limits=dataclasses.replace(limits, **changed),
        durable_ack=bool(values.get("durable_ack")),
        crediting=values.get("crediting") is not False,
    )


def _given_or(values: Mapping[str, Any], name: str, default: int) -> int:
    value = values.get(name)
    return default if value is None else int(value)


def redact_url(url: str) -> str:
    """The URL with its secrets replaced by ***: a password (redis://:***@host:6379/0), a NATS
    token in the user part (nats://***@host:4222) and password-like query parameters. A
    comma-separated list of URLs (NATS servers) is redacted URL by URL."""
    parts_of_list = url.split(",")
    if len(parts_of_list) > 1 and all("://" in part for part in parts_of_list):
        return ",".join(redact_url(part) for part in parts_of_list)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"  # unparseable: it may hold anything
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        if colon:
            user = f"{name}:***"
        elif parts.scheme.startswith("nats") or parts.scheme in ("tls", "ws", "wss"):
            user = "***"  # nats://TOKEN@host: the user part alone is the token
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in SECRET_QUERY else v) for k, v in pairs], safe="*"
            )
    return parts._replace(netloc=netloc, query=query).geturl()
