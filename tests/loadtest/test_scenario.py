"""Scenario knobs: TOML, flags that win over it, and refusals that name the knob."""

from __future__ import annotations

from pathlib import Path

import pytest

from giftstream.loadtest.scenario import (
    Scenario,
    ScenarioError,
    Storm,
    build,
    load_toml,
    parse_storm,
)


def test_storm_is_share_at_seconds() -> None:
    assert parse_storm("0.3@10") == Storm(share=0.3, at_s=10.0)
    assert parse_storm("25%@2.5") == Storm(share=0.25, at_s=2.5)
    for bad in ("0.3", "1.5@2", "0@2", "x@1", "0.5@-1"):
        with pytest.raises(ScenarioError, match="reconnect_storm"):
            parse_storm(bad)


def test_flags_win_over_the_file_which_wins_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[loadtest]\nviewers = 500\nrooms = 7\nduration = 12\nreconnect_storm = "0.2@5"\n'
        "storm_spread = 3\nclosed_loop = true\n"
    )
    s = build(load_toml(path), {"viewers": 300, "rooms": None, "seed": 9})
    assert (s.viewers, s.rooms, s.duration, s.seed, s.closed_loop) == (300, 7, 12.0, 9, True)
    assert s.reconnect_storm == Storm(share=0.2, at_s=5.0, spread_s=3.0)
    assert s.gifters == Scenario().gifters  # untouched knobs keep their default


def test_the_admin_url_follows_the_ws_host() -> None:
    assert build({}, {"url": "ws://127.0.0.2:9000/ws"}).admin == "http://127.0.0.2:8766"
    assert build({}, {}).is_local
    assert not build({}, {"url": "wss://gifts.example.com/ws"}).is_local


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"gifters": 20, "viewers": 10}, "gifters"),
        ({"duration": 0}, "duration"),
        ({"duration": 99999}, "duration"),
        ({"url": "http://x/ws"}, "url"),
        ({"reconnect_storm": "0.5@40", "duration": 30}, "reconnect_storm"),
        ({"slow_readers": 1.0}, "slow_readers"),
        ({"viewers": 60000, "workers": 2}, "workers"),
        ({"workers": 5, "viewers": 3, "gifters": 1}, "workers"),
    ],
)
def test_impossible_scenarios_are_refused_naming_the_knob(
    values: dict[str, object], named: str
) -> None:
    with pytest.raises(ScenarioError, match=named):
        build({}, values)


def test_unknown_or_mistyped_keys_in_a_file_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("viewrs = 10\n")
    with pytest.raises(ScenarioError, match="unknown scenario key 'viewrs'"):
        load_toml(path)
    path.write_text('viewers = "many"\n')
    with pytest.raises(ScenarioError, match="viewers"):
        load_toml(path)


def test_reports_never_carry_secrets() -> None:
    from giftstream.loadtest.scenario import redact_argv

    argv = [
        "loadtest",
        "--jwt-secret",
        "s3cret-jwt",
        "--webhook-secret=s3cret-hook",
        "--redis-url",
        "redis://:pw@10.0.0.5:6379/0",
        "--viewers",
        "5",
    ]
    assert redact_argv(argv) == [
        "loadtest",
        "--jwt-secret",
        "***",
        "--webhook-secret=***",
        "--redis-url",
        "redis://:***@10.0.0.5:6379/0",
        "--viewers",
        "5",
    ]
    s = build({}, {"redis_url": "redis://user:pw@127.0.0.1:6379/0"})
    assert s.as_dict()["redis_url"] == "redis://user:***@127.0.0.1:6379/0"


def test_the_ledger_key_is_read_as_the_server_reads_it(tmp_path: Path) -> None:
    """Flag, then GIFTSTREAM_LEDGER_KEY, then the scenario file, then the server's default:
    a load test and the server it checks never silently read different ledgers."""
    from giftstream.loadtest.cli import scenario_of
    from giftstream.server.cli import build_parser
    from giftstream.server.config import resolve
    from giftstream.server.money import keys

    def ledger_of(argv: list[str], env: dict[str, str], file_values: dict[str, str]) -> str:
        args = build_parser().parse_args(["loadtest", *argv])
        return scenario_of(args, resolve(args, env), dict(file_values), env).ledger_key

    from_file = {"ledger_key": "file:ledger"}
    assert ledger_of([], {}, {}) == keys.LEDGER
    assert ledger_of([], {}, from_file) == "file:ledger"
    assert ledger_of([], {"GIFTSTREAM_LEDGER_KEY": "env:ledger"}, from_file) == "env:ledger"
    flag = ["--ledger-key", "flag:ledger"]
    assert ledger_of(flag, {"GIFTSTREAM_LEDGER_KEY": "env:ledger"}, from_file) == "flag:ledger"
