"""The knobs of one load-test run: defaults, a TOML scenario file, and flags that win over it.

Every knob is validated here, once, with a message naming it, so a typo fails before a single
connection is opened. Bounds keep every run finite (duration, counts) and within what one
process can hold (file descriptors).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from giftstream.server.config import redact_url
from giftstream.server.money import keys

MAX_DURATION_S = 3600.0  # a run is bounded; longer soaks are several runs
MAX_CONNECTIONS_PER_WORKER = 19_000  # the machines cap a process at 20,000 descriptors
SERVER_GIFTS_PER_S = 20.0  # the server's default per-connection gift budget (Limits)


class ScenarioError(ValueError):
    """A knob is missing or invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class Secrets:
    """The server's two secrets: client tokens (JWT) and the internal API's signatures."""

    jwt: str
    webhook: str


@dataclass(frozen=True, slots=True)
class Storm:
    """At `at_s` into the run, `share` of the viewers drop at once and rejoin with `since`
    spread over `spread_s` seconds."""

    share: float
    at_s: float
    spread_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One run's workload. Field names are the TOML keys; `--flag-name` is each flag."""

    url: str = "ws://127.0.0.1:8765/ws"
    admin_url: str | None = None  # None: http://<host of url>:8766
    viewers: int = 1000
    rooms: int = 10
    gifters: int = 100  # how many of the viewers also send gifts
    gift_rate: float = 100.0  # gifts/s over all gifters (open loop)
    closed_loop: bool = False
    think_time: float = 0.06  # closed loop: pause after each answer (keeps under 20 gifts/s)
    duration: float = 30.0
    workers: int = 2
    reconnect_storm: Storm | None = None
    slow_readers: float = 0.0  # share of the non-gifting viewers that stop reading
    zipf_s: float = 1.1
    drain: float = 5.0  # seconds to wait for answers to gifts still in flight at the end
    connect_concurrency: int = 64  # handshakes in progress per worker
    seed: int = 1
    report: Path | None = None
    plot: Path | None = None
    server_pid: int | None = None
    redis_url: str | None = None
    ledger_key: str = keys.LEDGER

    @property
    def admin(self) -> str:
        if self.admin_url is not None:
            return self.admin_url.rstrip("/")
        host = urlparse(self.url).hostname or "127.0.0.1"
        return f"http://{_bracket(host)}:8766"

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def is_local(self) -> bool:
        """Whether the target is on this machine (loopback), where secrets and the server's
        process may be looked up locally."""
        return is_loopback(self.host)

    @property
    def per_gifter_rate(self) -> float:
        """Gifts a second one gifter is asked for (at most, in closed loop)."""
        if self.closed_loop:
            return 1.0 / self.think_time if self.think_time > 0 else math.inf
        return self.gift_rate / self.gifters if self.gifters else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The knobs as plain JSON values, for the report."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Storm):
                value = {"share": value.share, "at_s": value.at_s, "spread_s": value.spread_s}
            out[f.name] = value
        out["admin_url"] = self.admin
        if self.redis_url is not None:
            out["redis_url"] = redact_url(self.redis_url)
        return out


SECRET_FLAGS = ("--jwt-secret", "--webhook-secret")


def redact_argv(argv: list[str]) -> list[str]:
    """A command line as the report records it: secrets and Redis passwords replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if hide_next:
            out.append("***")
        elif eq and flag in SECRET_FLAGS:
            out.append(f"{flag}=***")
        elif eq and flag == "--redis-url":
            out.append(f"{flag}={redact_url(value)}")
        else:
            out.append(redact_url(arg) if "://" in arg else arg)
        hide_next = arg in SECRET_FLAGS
    return out


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def parse_storm(text: str) -> Storm:
    """`SHARE@SECONDS`, e.g. `0.3@10` or `30%@10`: that share of viewers drop at 10 s."""
    share_text, sep, at_text = text.partition("@")
    if not sep:
        raise ScenarioError(f"reconnect_storm {text!r}: expected SHARE@SECONDS, e.g. 0.3@10")
    try:
        share = float(share_text[:-1]) / 100 if share_text.endswith("%") else float(share_text)
        at_s = float(at_text)
    except ValueError:
        raise ScenarioError(
            f"reconnect_storm {text!r}: expected SHARE@SECONDS, e.g. 0.3@10"
        ) from None
    if not 0 < share <= 1:
        raise ScenarioError(f"reconnect_storm {text!r}: the share must be in (0, 1]")
    if at_s < 0:
        raise ScenarioError(f"reconnect_storm {text!r}: the time must be >= 0")
    return Storm(share=share, at_s=at_s)


# How each TOML value is read; flags go through the same functions.
_PARSERS: dict[str, Any] = {
    "url": str,
    "admin_url": str,
    "viewers": int,
    "rooms": int,
    "gifters": int,
    "gift_rate": float,
    "closed_loop": bool,
    "think_time": float,
    "duration": float,
    "workers": int,
    "slow_readers": float,
    "zipf_s": float,
    "drain": float,
    "connect_concurrency": int,
    "seed": int,
    "report": Path,
    "plot": Path,
    "server_pid": int,
    "redis_url": str,
    "ledger_key": str,
    "storm_spread": float,
}


def _coerce(name: str, value: Any) -> Any:
    if name == "reconnect_storm":
        return value if isinstance(value, Storm) else parse_storm(str(value))
    kind = _PARSERS.get(name)
    if kind is None:
        raise ScenarioError(f"unknown scenario key {name!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{name} must be true or false")
        return value
    if kind in (int, float) and isinstance(value, bool):
        raise ScenarioError(f"{name} must be a number")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ScenarioError(f"{name} must be a whole number")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ScenarioError(f"{name} = {value!r} is not a valid {kind.__name__}") from None


def _name(key: str) -> str:
    return key.replace("-", "_")


def load_toml(path: Path) -> dict[str, Any]:
    """A scenario file's knobs, each coerced; an unknown key is an error, not ignored."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"scenario {path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {path}: not valid TOML: {exc}") from exc
    table = raw.get("loadtest", raw)  # a [loadtest] table, or the keys at the top level
    if not isinstance(table, dict):
        raise ScenarioError(f"scenario {path}: [loadtest] must be a table")
    try:
        return {_name(key): _coerce(_name(key), value) for key, value in table.items()}
    except ScenarioError as exc:
        raise ScenarioError(f"scenario {path}: {exc}") from exc


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Scenario:
    """The scenario: defaults, then the file's values, then every flag that was given."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    spread = merged.pop("storm_spread", None)
    storm = merged.get("reconnect_storm")
    if storm is not None:
        storm = _coerce("reconnect_storm", storm)
        merged["reconnect_storm"] = replace(storm, spread_s=spread) if spread is not None else storm
    for key, value in list(merged.items()):
        if key != "reconnect_storm":
            merged[key] = _coerce(key, value)
    scenario = Scenario(**merged)
    validate(scenario)
    return scenario


def validate(s: Scenario) -> None:
    """Refuse a scenario that cannot run as asked; each message names the knob."""
    url = urlparse(s.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise ScenarioError(f"url {s.url!r} must be a ws:// or wss:// URL")
    if urlparse(s.admin).scheme not in ("http", "https"):
        raise ScenarioError(f"admin_url {s.admin!r} must be an http:// or https:// URL")
    if s.viewers < 1 or s.rooms < 1 or s.workers < 1:
        raise ScenarioError("viewers, rooms and workers must each be at least 1")
    if not 0 <= s.gifters <= s.viewers:
        raise ScenarioError(f"gifters ({s.gifters}) must be from 0 to viewers ({s.viewers})")
    if s.workers > s.viewers:
        raise ScenarioError(f"workers ({s.workers}) must not exceed viewers ({s.viewers})")
    if -(-s.viewers // s.workers) > MAX_CONNECTIONS_PER_WORKER:
        raise ScenarioError(
            f"{s.viewers} viewers over {s.workers} workers is over "
            f"{MAX_CONNECTIONS_PER_WORKER} connections a process: add --workers"
        )
    if not 0 < s.duration <= MAX_DURATION_S:
        raise ScenarioError(f"duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if not s.closed_loop and s.gifters and not s.gift_rate > 0:
        raise ScenarioError("gift_rate must be > 0 (or use closed_loop)")
    if not 0 <= s.think_time <= 60:
        raise ScenarioError("think_time must be from 0 to 60 seconds")
    if not 0 <= s.slow_readers < 1:
        raise ScenarioError("slow_readers must be a share from 0 to below 1")
    if round(s.slow_readers * (s.viewers - s.gifters)) > s.viewers - s.gifters:
        raise ScenarioError("slow_readers is larger than the viewers who do not gift")
    if not 0 < s.zipf_s <= 5:
        raise ScenarioError("zipf_s must be in (0, 5]")
    if not 0 <= s.drain <= 60:
        raise ScenarioError("drain must be from 0 to 60 seconds")
    if not 1 <= s.connect_concurrency <= 1000:
        raise ScenarioError("connect_concurrency must be from 1 to 1000")
    storm = s.reconnect_storm
    if storm is not None:
        if storm.at_s >= s.duration:
            raise ScenarioError(
                f"reconnect_storm at {storm.at_s} s is not within the {s.duration} s run"
            )
        if not 0 <= storm.spread_s <= 60:
            raise ScenarioError("storm_spread must be from 0 to 60 seconds")
    if s.server_pid is not None and s.server_pid <= 0:
        raise ScenarioError("server_pid must be a process id")
