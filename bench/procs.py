"""The processes a bench run owns: its Redis, the giftstream server, the three peers and the
Node client fleet. Every one is started on a free loopback port, with its soft open-files
limit raised to the hard one (inherited through exec), and stopped by its own pid."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from giftstream.server.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS_SRC = BENCH / "peers"
PEERS_DIR = BENCH / ".peers"  # gitignored: node_modules and the python-socketio venv
NODE_DIR = PEERS_DIR / "node"
PSIO_VENV = PEERS_DIR / "psio"
VENV_BIN = Path(sys.executable).parent


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s: {proc.args!r}")


def _run(cmd: list[str], **kw: Any) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=600, **kw)


def install_peers() -> dict[str, str]:
    """npm ci the pinned Node peers, and a venv with the pinned python-socketio; only when
    the pinned files changed. Returns the versions installed."""
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    stamp = NODE_DIR / ".stamp"
    wanted = (PEERS_SRC / "package.json").read_text() + (
        PEERS_SRC / "package-lock.json"
    ).read_text()
    if not stamp.exists() or stamp.read_text() != wanted:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(PEERS_SRC / name, NODE_DIR / name)
        _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR)
        stamp.write_text(wanted)
    pstamp = PSIO_VENV / ".stamp"
    reqs = (PEERS_SRC / "requirements.txt").read_text()
    if not pstamp.exists() or pstamp.read_text() != reqs:
        _run([sys.executable, "-m", "venv", "--clear", str(PSIO_VENV)])
        _run(
            [
                str(PSIO_VENV / "bin" / "pip"),
                "install",
                "-q",
                "-r",
                str(PEERS_SRC / "requirements.txt"),
            ]
        )
        pstamp.write_text(reqs)
    versions = {}
    for mod in ("ws", "socket.io"):
        meta = json.loads((NODE_DIR / "node_modules" / mod / "package.json").read_text())
        versions[mod] = meta["version"]
    out = subprocess.run(
        [
            str(PSIO_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('python-socketio'),"
            " m.version('aiohttp'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    versions["python-socketio"], versions["aiohttp (peer)"] = out.stdout.split()
    return versions


class Proc:
    """One child process with its log file; `stop()` ends it by its pid."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_dir: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd or ROOT,
            preexec_fn=raise_nofile,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.popen.pid)
        if port is not None:
            wait_port(port, self.popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()


class Giftstream:
    """Its own Redis (a redis-server child in the bench's temp dir) and `giftstream serve`."""

    def __init__(self, tmp: Path, *, raised_limits: bool = False, name: str = "giftstream") -> None:
        self.name = name
        self.data_dir = tmp / f"{name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(tmp / f"{name}-redis").start()
        self.redis_ps = psutil.Process(self.redis.process.pid)  # type: ignore[union-attr]
        self.port, self.admin_port = free_port(), free_port()
        serve = (
            [str(VENV_BIN / "python"), "-m", "bench.serve"]
            if raised_limits
            else [str(VENV_BIN / "giftstream"), "serve"]
        )
        self.cmd = [
            *serve,
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--redis-url",
            self.redis.url,
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "WARNING",
            # every benchmark client connects from 127.0.0.1: no cap per address
            "--max-connections-per-ip",
            "0",
        ]
        self.server = Proc(name, self.cmd, tmp, port=self.port)
        wait_port(self.admin_port, self.server.popen)
        from giftstream.server.config import load_or_create_secret

        self.jwt_secret = load_or_create_secret(self.data_dir, "jwt_secret")
        self.webhook_secret = load_or_create_secret(self.data_dir, "webhook_secret")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def restart_server(self, tmp: Path) -> None:
        """A fresh server process on the same Redis (for a clean RSS baseline)."""
        self.server.stop()
        self.server = Proc(self.name, self.cmd, tmp, port=self.port)
        wait_port(self.admin_port, self.server.popen)

    def stop(self) -> None:
        self.server.stop()
        self.redis.stop()


def start_peer(kind: str, tmp: Path) -> Proc:
    port = free_port()
    env = {"NODE_PATH": str(NODE_DIR / "node_modules")}
    if kind == "ws":
        cmd = ["node", str(PEERS_SRC / "ws_server.js"), "--port", str(port)]
    elif kind == "sio":
        cmd = ["node", str(PEERS_SRC / "sio_server.js"), "--port", str(port)]
    elif kind == "psio":
        cmd = [
            str(PSIO_VENV / "bin" / "python"),
            str(PEERS_SRC / "psio_server.py"),
            "--port",
            str(port),
        ]
    else:
        raise ValueError(kind)
    return Proc(f"peer-{kind}", cmd, tmp, port=port, env=env)
