"""The end-of-run checks find what they are there to find: a gap, a missing event, a gift
without an answer, a key answered twice differently. And secrets are never made up for a
remote server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from giftstream.loadtest.check import Outcome, check_answers, check_deliveries
from giftstream.loadtest.cli import resolve_secrets
from giftstream.loadtest.scenario import build
from giftstream.server.config import ConfigError, redact_url
from giftstream.server.embedded_redis import free_port


def viewer(user: str, **fields: Any) -> dict[str, Any]:
    base = {
        "user": user,
        "room": "r",
        "gifter": False,
        "slow": False,
        "storm": False,
        "status": "intact",
        "start_seq": 0,
        "last_seq": 3,
        "gift_events": 3,
        "gaps": 0,
        "missing": 0,
        "disorder": 0,
        "slow_outcome": None,
    }
    return {**base, **fields}


def outcome(*clients: dict[str, Any]) -> Outcome:
    out = Outcome(
        acks=[(f"e{i}", "g", f"key-{i}", "r", "rose", 1, 1) for i in (1, 2, 3)],
        clients=list(clients),
    )
    out.add_room_seqs({"r": {1: "e1", 2: "e2", 3: "e3"}})
    return out


def test_complete_in_order_deliveries_pass() -> None:
    check, summary = check_deliveries(outcome(viewer("a"), viewer("b", storm=True)))
    assert check.status == "pass", check.breaches
    assert summary["checked"] == 2 and summary["storm_rejoined_checked"] == 1


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"gaps": 1, "missing": 1, "gift_events": 2}, "1 gaps"),
        ({"disorder": 1}, "out of order"),
        ({"gift_events": 2, "last_seq": 2}, "received 2 of 3"),
    ],
)
def test_a_gap_a_reorder_or_a_missing_tail_fails(bad: dict[str, Any], says: str) -> None:
    check, _ = check_deliveries(outcome(viewer("a"), viewer("b", **bad)))
    assert check.status == "fail"
    assert any(says in b and "viewer b" in b for b in check.breaches), check.breaches


def test_excluded_viewers_are_counted_not_checked() -> None:
    slow = viewer("s", slow=True, status="slow", gift_events=0, slow_outcome="closed_4008")
    lost = viewer("l", status="unrecovered", gift_events=1, gaps=1)
    check, summary = check_deliveries(outcome(viewer("a"), slow, lost))
    assert check.status == "pass"
    assert summary["statuses"] == {"intact": 1, "slow": 1, "unrecovered": 1}
    assert summary["slow_readers"] == {"closed_4008": 1}


def test_an_acknowledged_gift_no_viewer_received_fails() -> None:
    out = outcome(viewer("a"))
    out.acks.append(("e9", "g", "key-9", "r", "rose", 1, 1))
    check, _ = check_deliveries(out)
    assert any("e9 reached no viewer" in b for b in check.breaches)


def test_unanswered_gifts_and_conflicting_answers_fail() -> None:
    out = outcome(viewer("a"))
    assert check_answers(out).status == "pass"
    out.unresolved.append(("g", "key-7", 5))
    out.acks.append(("e5", "g", "key-1", "r", "rose", 1, 1))  # key-1 was e1
    out.add_room_seqs({"r": {2: "e7"}})
    check = check_answers(out)
    assert check.status == "fail" and check.count == 3
    text = " ".join(check.breaches)
    assert "key-7" in text and "acknowledged as e1 and e5" in text and "seq 2: e2 and e7" in text


def _values(data_dir: Path, **given: str) -> dict[str, Any]:
    return {"data_dir": data_dir, "jwt_secret": None, "webhook_secret": None, **given}


def test_a_remote_server_needs_its_secrets(tmp_path: Path) -> None:
    remote = build({}, {"url": "ws://10.1.2.3:8765/ws"})
    with pytest.raises(ConfigError, match="--jwt-secret"):
        resolve_secrets(remote, _values(tmp_path))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing was created
    (tmp_path / "jwt_secret").write_text("j" * 32 + "\n")
    with pytest.raises(ConfigError, match="--webhook-secret"):
        resolve_secrets(remote, _values(tmp_path))
    keys = resolve_secrets(remote, _values(tmp_path, webhook_secret="w" * 32))
    assert (keys.jwt, keys.webhook) == ("j" * 32, "w" * 32)


def test_a_local_server_reads_the_data_dir_as_the_server_does(tmp_path: Path) -> None:
    keys = resolve_secrets(build({}, {}), _values(tmp_path))
    assert (tmp_path / "jwt_secret").read_text().strip() == keys.jwt
    assert resolve_secrets(build({}, {}), _values(tmp_path)) == keys  # the same, read back


def test_the_cli_wires_every_documented_flag() -> None:
    from giftstream.server.cli import build_parser

    args = build_parser().parse_args(
        [
            "loadtest",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--viewers",
            "5",
            "--closed-loop",
            "--reconnect-storm",
            "0.5@1",
            "--slow-readers",
            "0.2",
            "--report",
            "r.json",
            "--plot",
            "p.png",
            "--seed",
            "4",
            "--workers",
            "1",
            "--gifters",
            "2",
        ]
    )
    assert isinstance(args, argparse.Namespace)
    assert (args.viewers, args.closed_loop, args.reconnect_storm, args.seed) == (
        5,
        True,
        "0.5@1",
        4,
    )


async def test_a_run_that_hangs_is_stopped_at_its_budget(tmp_path: Path) -> None:
    """A server that takes the connection and never answers: the run ends by itself."""
    import asyncio
    import time

    from rich.console import Console

    from giftstream.loadtest import runner

    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    scenario = build(
        {},
        {
            "url": f"ws://127.0.0.1:{port}/ws",
            "admin_url": f"http://127.0.0.1:{port}",
            "viewers": 2,
            "gifters": 1,
            "rooms": 1,
            "workers": 1,
        },
    )
    keys = resolve_secrets(scenario, _values(tmp_path))
    started = time.monotonic()
    try:
        with pytest.raises(runner.RunError, match="did not finish within 2s"):
            await runner.run(scenario, keys, Console(quiet=True), budget_s=2)
    finally:
        silent.close()
    assert time.monotonic() - started < 10
    assert runner.time_budget(scenario) > scenario.duration


async def test_an_unreachable_redis_is_named_without_its_password() -> None:
    """The end-of-run Redis checks, and the ledger position read before the run."""
    from giftstream.loadtest.check import check_redis
    from giftstream.loadtest.runner import RunError, _ledger_position
    from giftstream.server.money.keys import SINGLE

    bad_redis = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    checks = await check_redis(bad_redis, SINGLE, None, outcome(), {"g"}, {})
    for check in checks:
        assert check.status == "fail"
        assert check.breaches[0].startswith(f"cannot read Redis at {redact_url(bad_redis)}: ")
        assert "hunter2" not in " ".join(check.breaches)
    with pytest.raises(RunError) as raised:
        await _ledger_position(bad_redis, "giftstream:ledger")
    assert str(raised.value).startswith(f"cannot read the ledger at {redact_url(bad_redis)}: ")
    assert "hunter2" not in str(raised.value)
