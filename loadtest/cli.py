"""`giftstream loadtest`: flags (and a TOML scenario, which flags override) to a run, and the
exit code: 0 PASS, 1 FAIL (a money or delivery check failed), 2 the run could not be made.

Kept light to import: `giftstream --help` builds this parser without loading the workers,
rich or matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from giftstream.loadtest.scenario import Scenario, Secrets
from giftstream.server.config import ConfigError, add_options, given

EXTRA_HINT = "giftstream loadtest needs its extra: pip install 'giftstream[loadtest]'"


def add_loadtest_parser(commands: Any) -> None:
    """The `loadtest` sub-command and its flags (each default is the scenario's)."""
    p: argparse.ArgumentParser = commands.add_parser(
        "loadtest",
        help="load-test a running server and check its money afterwards",
        description="Simulate viewers and gifters over real WebSockets, report latency and "
        "throughput, then check the money (PASS/FAIL). Flags win over --scenario.",
    )
    p.add_argument("--scenario", type=Path, help="TOML file with the same knobs as the flags")
    p.add_argument("--url", help="WebSocket URL (default ws://127.0.0.1:8765/ws)")
    p.add_argument("--admin-url", help="internal API URL (default http://<url host>:8766)")
    p.add_argument("--viewers", type=int, help="viewer connections in all (default 1000)")
    p.add_argument("--rooms", type=int, help="live rooms, one creator each (default 10)")
    p.add_argument("--gifters", type=int, help="viewers that also send gifts (default 100)")
    p.add_argument("--gift-rate", type=float, help="open loop: gifts/s over all gifters (100)")
    p.add_argument(
        "--closed-loop",
        action="store_true",
        default=None,
        help="each gifter sends its next gift when the last is answered",
    )
    p.add_argument(
        "--think-time", type=float, help="closed loop: seconds after each answer (default 0.06)"
    )
    p.add_argument("--duration", type=float, help="seconds of load (default 30)")
    p.add_argument("--workers", type=int, help="load-generating processes (default 2)")
    p.add_argument(
        "--reconnect-storm",
        metavar="SHARE@SECONDS",
        help="that share of viewers drop at that time and rejoin with since",
    )
    p.add_argument(
        "--storm-spread", type=float, help="seconds over which storm viewers rejoin (default 2)"
    )
    p.add_argument(
        "--slow-readers",
        type=float,
        metavar="SHARE",
        help="share of non-gifting viewers that stop reading (default 0)",
    )
    p.add_argument("--zipf", dest="zipf_s", type=float, help="room popularity skew (default 1.1)")
    p.add_argument("--drain", type=float, help="seconds to wait for in-flight answers (5)")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the JSON report")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="write the plot")
    p.add_argument("--seed", type=int, help="workload seed (default 1)")
    p.add_argument(
        "--server-pid",
        type=int,
        help="server process for CPU/RSS (default: the local listener, if found)",
    )
    # The server's own options, read as the server reads them (flag, then GIFTSTREAM_*
    # variable, then default); a scenario file's ledger_key stands when neither is given.
    add_options(
        p,
        only=("--redis-url", "--data-dir", "--ledger-key", "--jwt-secret", "--webhook-secret"),
        helps={
            "--redis-url": "the server's Redis, for the audit and ledger checks (local "
            "default: the data dir's embedded Redis)",
            "--data-dir": "where the server keeps its secrets and embedded Redis",
            "--ledger-key": "the server's ledger stream, for the audit and ledger checks",
            "--jwt-secret": "the server's token secret (default: read from the data dir)",
            "--webhook-secret": "the server's internal API secret (default: read from the "
            "data dir)",
        },
    )


FLAGS = (
    "url",
    "admin_url",
    "viewers",
    "rooms",
    "gifters",
    "gift_rate",
    "closed_loop",
    "think_time",
    "duration",
    "workers",
    "reconnect_storm",
    "storm_spread",
    "slow_readers",
    "zipf_s",
    "drain",
    "report",
    "plot",
    "seed",
    "server_pid",
)


def run_loadtest(args: argparse.Namespace, values: dict[str, Any]) -> int:
    try:
        import hdrh  # type: ignore[import-untyped]  # noqa: F401
        import rich  # noqa: F401
    except ImportError:
        print(f"giftstream: error: {EXTRA_HINT}", file=sys.stderr)
        return 2
    import uvloop
    from rich.console import Console

    from giftstream.loadtest import runner
    from giftstream.loadtest.scenario import ScenarioError, load_toml, redact_argv

    # A file or pipe (CI) gets 120 columns rather than rich's 80, so tables stay readable.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    try:
        file_values = load_toml(args.scenario) if args.scenario else {}
        scenario = _locate(scenario_of(args, values, file_values), values)
        keys = resolve_secrets(scenario, values)
        command = redact_argv(sys.argv[1:])
        result = uvloop.run(runner.run(scenario, keys, console, command=command))
    except (ScenarioError, ConfigError, runner.RunError) as exc:
        print(f"giftstream: error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.passed else 1


def scenario_of(
    args: argparse.Namespace,
    values: dict[str, Any],
    file_values: dict[str, Any],
    env: Mapping[str, str] | None = None,
) -> Scenario:
    """The run's scenario: defaults, then the file, then the flags; the server's options
    (`values`, resolved as the server resolves them) win over the file only when given."""
    from giftstream.loadtest.scenario import build

    flags = {name: getattr(args, name) for name in FLAGS}
    flags["redis_url"] = values.get("redis_url")
    if given(args, "ledger_key", env) or "ledger_key" not in file_values:
        flags["ledger_key"] = values["ledger_key"]
    return build(file_values, flags)


def _locate(scenario: Scenario, values: dict[str, Any]) -> Scenario:
    """On a loopback target, find what the server's own data dir and process tell: its
    embedded Redis (as `giftstream audit` does) and its pid (for CPU and RSS)."""
    from dataclasses import replace
    from urllib.parse import urlparse

    from giftstream.server.embedded_redis import running_embedded_url

    if not scenario.is_local:
        return scenario
    if scenario.redis_url is None:
        scenario = replace(scenario, redis_url=running_embedded_url(values["data_dir"] / "redis"))
    if scenario.server_pid is None:
        from giftstream.loadtest.system import find_listener_pid

        url = urlparse(scenario.url)
        port = url.port or (443 if url.scheme == "wss" else 80)
        scenario = replace(scenario, server_pid=find_listener_pid(port))
    return scenario


def resolve_secrets(scenario: Scenario, values: dict[str, Any]) -> Secrets:
    """The JWT and webhook secrets: flags or environment first, else the data dir, as the
    server reads them. A loopback server's secrets are created there if missing (as the
    server would); a remote server's never are: a missing one is an error."""
    from giftstream.server.config import load_or_create_secret

    data_dir: Path = values["data_dir"]
    found: dict[str, str] = {}
    for name, flag in (("jwt_secret", "--jwt-secret"), ("webhook_secret", "--webhook-secret")):
        given = values.get(name)
        if given:
            found[name] = given
        elif scenario.is_local:
            found[name] = load_or_create_secret(data_dir, name)
        else:
            path = data_dir / name
            try:
                found[name] = path.read_text(encoding="utf-8").strip()
            except OSError:
                found[name] = ""
            if not found[name]:
                raise ConfigError(
                    f"{flag}: not given and no {path} to read it from; loadtesting a remote "
                    f"server needs that server's secret (flag or GIFTSTREAM_{name.upper()})"
                )
    return Secrets(jwt=found["jwt_secret"], webhook=found["webhook_secret"])
