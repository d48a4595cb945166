"""`giftstream loadtest` end to end: a real server process on the test Redis, real sockets,
spawned worker processes, and the exit code and report a user would get."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from giftstream.loadtest import hist
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.processes import GIFTSTREAM, ServerProcess, run_cli


@pytest.fixture
def server(redis_url: str, data_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir, "--redis-url", redis_url).start()
    yield proc
    if proc.running:
        proc.stop()


def loadtest_args(server: ServerProcess, redis_url: str, *args: str) -> list[str]:
    return [
        "loadtest",
        "--url",
        server.ws_url,
        "--admin-url",
        server.admin_url,
        "--jwt-secret",
        JWT_SECRET,
        "--webhook-secret",
        WEBHOOK_SECRET,
        "--redis-url",
        redis_url,
        "--workers",
        "2",
        "--drain",
        "2",
        *args,
    ]


def run(server: ServerProcess, redis_url: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run it; the JSON report, after checking the exit code matches its verdict."""
    report = tmp_path / "report.json"
    done = run_cli(*loadtest_args(server, redis_url, "--report", str(report), *args), timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.rstrip().endswith("PASS"), output
    return dict(json.loads(report.read_text()))


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def test_a_short_closed_loop_run_passes_with_report_and_plot(
    server: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    assert server.proc is not None
    plot = tmp_path / "run.png"
    report = run(
        server,
        redis_url,
        tmp_path,
        "--viewers",
        "60",
        "--rooms",
        "5",
        "--gifters",
        "10",
        "--duration",
        "3",
        "--closed-loop",
        "--plot",
        str(plot),
        "--server-pid",
        str(server.proc.pid),
    )
    assert report["result"] == "PASS" and not report["aborted"]
    assert JWT_SECRET not in json.dumps(report) and WEBHOOK_SECRET not in json.dumps(report)
    assert statuses(report) == dict.fromkeys(
        ("answers", "wallets", "audit", "ledger", "deliveries"), "pass"
    )
    totals = report["totals"]
    assert totals["gifts_acked"] == totals["gifts_sent"] > 50
    assert totals["gift_events"] >= totals["gifts_acked"]  # every gift reached its room
    money = report["money"]
    assert money["coins_bought"] == money["coins_held"] + money["coins_spent"] > 0
    assert report["viewers"]["checked"] == 60
    ack = report["latency_ms"]["gift_ack"]
    assert ack["count"] == totals["gifts_acked"]
    assert 0 < ack["p50"] <= ack["p99"] <= ack["max"]
    screen = report["latency_ms"]["send_to_screen"]
    assert screen["count"] == totals["gift_events"] and screen["p50"] > 0
    decoded = hist.merge([report["histograms"]["gift_ack"].encode()])
    assert decoded.get_total_count() == ack["count"]
    assert len(report["series"]) >= 3 and report["series"][0]["gifts_acked"] > 0
    assert report["server"]["pid"] == server.proc.pid and report["server"]["rss_mb_max"] > 0
    assert report["server"]["metrics_delta"]["gifts_settled"] == totals["gifts_acked"]
    assert report["load_generator"]["workers_cpu_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_an_open_loop_run_keeps_its_target_rate(
    server: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    report = run(
        server,
        redis_url,
        tmp_path,
        "--viewers",
        "40",
        "--rooms",
        "4",
        "--gifters",
        "20",
        "--gift-rate",
        "100",
        "--duration",
        "3",
    )
    totals = report["totals"]
    # 20 gifters at 5/s each, each starting within its first interval: exactly 15 each
    assert totals["gifts_sent"] == 300
    assert 90 <= totals["gifts_settled_per_s"] <= 110
    for second in report["series"][:3]:
        assert 70 <= second["gifts_sent"] <= 130, report["series"]
    assert report["latency_ms"]["send_lag"]["count"] == 300


def test_viewers_that_rejoin_after_a_storm_miss_no_gift_event(
    server: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    report = run(
        server,
        redis_url,
        tmp_path,
        "--viewers",
        "80",
        "--rooms",
        "4",
        "--gifters",
        "16",
        "--gift-rate",
        "80",
        "--duration",
        "4",
        "--reconnect-storm",
        "0.5@1.5",
        "--storm-spread",
        "1",
    )
    assert report["storm"] == {"dropped": 40, "rejoined_unrecovered": 0}
    assert report["totals"]["reconnects"] >= 40
    viewers = report["viewers"]
    assert viewers["statuses"] == {"intact": 80}
    assert viewers["storm_rejoined_checked"] == 40  # every storm viewer was held to the check
    assert statuses(report)["deliveries"] == "pass"
    # the events they missed while away came back through `since`, late, and are timed so
    assert report["latency_ms"]["send_to_screen"]["max"] > 100


def test_a_wallet_changed_behind_its_back_fails_the_run(
    server: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    args = loadtest_args(
        server,
        redis_url,
        "--viewers",
        "20",
        "--rooms",
        "2",
        "--gifters",
        "4",
        "--duration",
        "3",
        "--closed-loop",
        "--report",
        str(report),
    )
    proc = subprocess.Popen(
        [*GIFTSTREAM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    client = redis.Redis.from_url(redis_url)
    tampered = None
    try:
        deadline = time.monotonic() + 30
        while tampered is None and time.monotonic() < deadline and proc.poll() is None:
            keys = sorted(client.scan_iter(match="giftstream:wallet:lt*-v*"))
            if keys:
                tampered = keys[0].decode().removeprefix("giftstream:wallet:")
                client.hincrby(keys[0], "coins", 1000)  # coins from nowhere: no ledger entry
            else:
                time.sleep(0.05)
        output, _ = proc.communicate(timeout=90)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    assert tampered is not None, output
    assert proc.returncode == 1, output
    assert output.rstrip().endswith("FAIL"), output
    found = json.loads(report.read_text())
    assert found["result"] == "FAIL"
    checks = {c["name"]: c for c in found["checks"]}
    assert checks["wallets"]["status"] == "fail"
    assert any(tampered in b for b in checks["wallets"]["breaches"])
    assert checks["audit"]["status"] == "fail"
    assert any(tampered in b for b in checks["audit"]["breaches"])
    assert checks["deliveries"]["status"] == "pass"  # only the money was touched


def test_slow_readers_stop_reading_and_are_reported_apart(
    server: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    """A quarter of the readers stop reading at the start; at the end each is read out and
    reported (still open here: a 4 s run does not fill the server's 1 MiB backlog bound),
    and left out of the delivery check, which the others pass."""
    report = run(
        server,
        redis_url,
        tmp_path,
        "--viewers",
        "40",
        "--rooms",
        "2",
        "--gifters",
        "8",
        "--gift-rate",
        "80",
        "--duration",
        "3",
        "--slow-readers",
        "0.25",
    )
    viewers = report["viewers"]
    assert viewers["statuses"] == {"intact": 32, "slow": 8}
    assert viewers["slow_readers"] == {"open": 8}
    assert viewers["checked"] == 32 and statuses(report)["deliveries"] == "pass"
