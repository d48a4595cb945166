"""A run's results: the JSON report (the record of a run, format in docs/loadtest.md), the
summary table printed at the end, and the plot of throughput and latency over time."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.table import Table

from giftstream.loadtest import hist
from giftstream.loadtest.check import Check
from giftstream.loadtest.collect import Tally
from giftstream.loadtest.plan import Plan
from giftstream.loadtest.scenario import Scenario
from giftstream.loadtest.system import ServerWatch

if TYPE_CHECKING:
    from giftstream.loadtest.runner import Finals

REPORT_VERSION = 1


def build_report(
    s: Scenario,
    plan: Plan,
    tally: Tally,
    finals: Finals,
    checks: list[Check],
    money: dict[str, int],
    delivery: dict[str, Any],
    watch: ServerWatch,
    *,
    passed: bool,
    aborted: bool,
    started: float,
    nofile: int,
    command: list[str] | None,
) -> dict[str, Any]:
    counts = finals.counts
    ack = hist.merge(finals.ack_hist)
    lag = hist.merge(finals.lag_hist)
    series = tally.series()
    seconds = s.duration
    peak = max((row["connections"] or 0 for row in series), default=0)
    timed_acks = counts.get("gifts_acked", 0) - finals.extra.get("gifts_resolved_late", 0)
    return {
        "tool": "giftstream loadtest",
        "version": REPORT_VERSION,
        "run_id": plan.run_id,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "command": command,
        "result": "PASS" if passed else "FAIL",
        "aborted": aborted,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nofile_limit": nofile,
        },
        "scenario": s.as_dict(),
        "plan": {
            "creators": len(plan.creators),
            "gifters": len(plan.gifters),
            "coins_per_gifter": plan.coins_per_gifter,
            "package": plan.package["id"],
            "room_viewers": plan.room_viewers,
            "gift_mix": {
                g.id: round(w / sum(plan.mix.weights), 4)
                for g, w in zip(plan.mix.gifts, plan.mix.weights, strict=True)
            },
        },
        "totals": {
            **counts,
            "gifts_resolved_after_run": finals.extra.get("gifts_resolved_late", 0),
            "gifts_settled_per_s": round(timed_acks / seconds, 1),
            "gifts_sent_per_s": round(counts.get("gifts_sent", 0) / seconds, 1),
            "events_per_s": round(counts.get("events", 0) / seconds, 1),
            "gift_events_per_s": round(counts.get("gift_events", 0) / seconds, 1),
            "frames_per_s": round(counts.get("frames", 0) / seconds, 1),
            "connections_peak": peak,
            "connect_failed": finals.extra.get("connect_failed", 0),
            "unmatched_receipts": tally.unmatched_receipts,
            "negative_latencies": tally.negative_latencies,
        },
        "latency_ms": {
            "gift_ack": hist.summary_ms(ack),
            "send_to_screen": hist.summary_ms(tally.screen),
            "send_lag": hist.summary_ms(lag),
        },
        "histograms": {  # HdrHistogram V2 base64, microseconds: merge or replot them later
            "gift_ack": hist.encode(ack).decode(),
            "send_to_screen": hist.encode(tally.screen).decode(),
            "send_lag": hist.encode(lag).decode(),
        },
        "errors": dict(sorted(finals.errors.items())),
        "closes": dict(sorted(finals.closes.items())),
        "storm": {
            "dropped": finals.extra.get("storm_dropped", 0),
            "rejoined_unrecovered": finals.extra.get("unrecovered", 0),
        },
        "viewers": delivery,
        "money": money,
        "server": watch.summary(),
        "load_generator": {
            "workers_cpu_s": round(sum(finals.cpu_s), 2),
            "coordinator_cpu_s": round(finals.coordinator_cpu_s, 2),
            "wall_s": round(finals.wall_s, 2),
            "cpu_percent_mean": round(
                100 * (sum(finals.cpu_s) + finals.coordinator_cpu_s) / max(finals.wall_s, 1e-9), 1
            ),
        },
        "checks": [c.as_dict() for c in checks],
        "series": series,
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _slow_readers(report: dict[str, Any]) -> str:
    """How the slow readers ended: closed by the server (4008, or cut off with 1006 when the
    close frame itself sat behind the unread backlog) or still open."""
    outcomes: dict[str, int] = report["viewers"].get("slow_readers") or {}
    if not outcomes:
        return "-"
    closed = sum(n for k, n in outcomes.items() if k.startswith("closed"))
    parts = [f"{closed} of {sum(outcomes.values())} closed by the server"]
    parts += [
        f"close {k.removeprefix('closed_')}: {n}"
        for k, n in outcomes.items()
        if k.startswith("closed")
    ]
    if outcomes.get("open"):
        parts.append(f"{outcomes['open']} still open (backlog under the server's bound)")
    server_closes = (report["server"].get("metrics_delta") or {}).get("slow_consumer_closes")
    if server_closes is not None:
        parts.append(f"server counted {server_closes:g} slow-consumer closes")
    return "; ".join(parts)


def print_summary(console: Console, report: dict[str, Any]) -> None:
    """The end-of-run tables: throughput, latency, errors, server, checks."""
    t = report["totals"]
    s = report["scenario"]
    run = Table(title=f"run {report['run_id']}", title_justify="left", show_header=False)
    run.add_column(justify="left")
    run.add_column(justify="right")
    rows: list[tuple[str, Any]] = [
        (
            "viewers / gifters / rooms / workers",
            f"{s['viewers']} / {s['gifters']} / {s['rooms']} / {s['workers']}",
        ),
        ("mode", "closed loop" if s["closed_loop"] else f"open loop, {s['gift_rate']:g} gifts/s"),
        ("duration", f"{s['duration']:g} s"),
        ("gifts sent", t.get("gifts_sent")),
        ("gifts acknowledged (settled)", t.get("gifts_acked")),
        ("gifts settled / s", t["gifts_settled_per_s"]),
        ("gifts refused", t.get("gifts_refused")),
        ("gifts not sent: gifter offline (storm)", t.get("gifts_skipped_offline")),
        ("gifts not sent: out of coins", t.get("out_of_coins")),
        ("gifts answered only after the run", t.get("gifts_resolved_after_run")),
        ("room events delivered / s", t["events_per_s"]),
        ("gift events delivered / s", t["gift_events_per_s"]),
        ("frames received / s", t["frames_per_s"]),
        ("connections held (peak)", t["connections_peak"]),
        ("reconnects", t.get("reconnects")),
        (
            "storm: dropped / rejoined unrecovered",
            f"{report['storm']['dropped']} / {report['storm']['rejoined_unrecovered']}",
        ),
        ("slow readers", _slow_readers(report)),
        (
            "load generator CPU (all its processes)",
            f"{report['load_generator']['cpu_percent_mean']:g}% of one core",
        ),
    ]
    for label, value in rows:
        run.add_row(label, _fmt(value))
    console.print(run)

    lat = Table(title="latency (ms)", title_justify="left")
    for name in ("", "count", "p50", "p95", "p99", "p99.9", "max"):
        lat.add_column(name, justify="right" if name else "left")
    labels = {
        "gift_ack": "gift ack (send -> gift_ok)",
        "send_to_screen": "send -> screen (every viewer)",
        "send_lag": "send lag (due -> sent)",
    }
    for key, label in labels.items():
        row = report["latency_ms"][key]
        lat.add_row(label, *(_fmt(row[k]) for k in ("count", "p50", "p95", "p99", "p999", "max")))
    console.print(lat)

    if report["errors"] or report["closes"]:
        errs = Table(title="errors and closes", title_justify="left")
        errs.add_column("code")
        errs.add_column("count", justify="right")
        for code, n in report["errors"].items():
            errs.add_row(code, _fmt(n))
        for code, n in report["closes"].items():
            errs.add_row(f"close {code}", _fmt(n))
        console.print(errs)

    server = report["server"]
    if len(server) > 1:
        srv = Table(
            title=f"server (pid {server.get('pid') or '?'})",
            title_justify="left",
            show_header=False,
        )
        srv.add_column()
        srv.add_column(justify="right")
        for key in ("cpu_percent_mean", "cpu_percent_max", "rss_mb_max"):
            if key in server:
                srv.add_row(key, _fmt(server[key]))
        for key, value in (server.get("metrics_delta") or {}).items():
            srv.add_row(f"{key} (during run)", _fmt(value))
        console.print(srv)

    checks = Table(title="checks", title_justify="left")
    checks.add_column("check")
    checks.add_column("result")
    checks.add_column("detail", overflow="fold")
    style = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skipped": "[yellow]skipped[/]"}
    for check in report["checks"]:
        detail = check["detail"]
        if check["breaches"]:
            more = check["breach_count"] - len(check["breaches"])
            detail += "\n" + "\n".join(check["breaches"])
            detail += f"\n... and {more} more" if more else ""
        checks.add_row(check["name"], style[check["status"]], detail)
    console.print(checks)


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Throughput, deliveries and latency per second (one PNG, three panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["series"]
    t = [row["t"] for row in rows]
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    s = report["scenario"]
    fig.suptitle(
        f"giftstream loadtest {report['run_id']}: {s['viewers']} viewers, {s['rooms']} rooms, "
        + ("closed loop" if s["closed_loop"] else f"{s['gift_rate']:g} gifts/s open loop")
        + f" — {report['result']}"
    )
    top.plot(t, [r["gifts_sent"] for r in rows], label="gifts sent/s")
    top.plot(t, [r["gifts_acked"] for r in rows], label="gifts settled/s")
    if not s["closed_loop"]:
        top.axhline(s["gift_rate"], color="grey", linestyle=":", label="target")
    top.set_ylabel("gifts / s")
    cpu = [r.get("server_cpu_percent") for r in rows]
    if any(v is not None for v in cpu):
        twin = top.twinx()
        twin.plot(
            t,
            [v if v is not None else float("nan") for v in cpu],
            color="tab:red",
            alpha=0.4,
            label="server CPU %",
        )
        twin.set_ylabel("server CPU %")
        twin.legend(loc="upper right")
    top.legend(loc="upper left")
    mid.plot(t, [r["events"] for r in rows], label="room events delivered/s")
    mid.plot(t, [r["frames"] for r in rows], label="frames received/s")
    mid.set_ylabel("per second")
    mid.legend(loc="upper left")
    for key, label in (
        ("ack_p50_ms", "ack p50"),
        ("ack_p99_ms", "ack p99"),
        ("screen_p50_ms", "screen p50"),
        ("screen_p99_ms", "screen p99"),
    ):
        values = [r[key] if r[key] is not None else float("nan") for r in rows]
        low.plot(t, values, label=label, linestyle="--" if "p50" in key else "-")
    low.set_yscale("log")
    low.set_ylabel("latency (ms)")
    low.set_xlabel("seconds into the run")
    low.legend(loc="upper left")
    for ax in (top, mid, low):
        ax.grid(True, alpha=0.3)
        ax.axvline(s["duration"], color="grey", linewidth=0.8)  # load ends; drain follows
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
