"""Real processes for tests: `giftstream` commands and a server that can be stopped,
killed -9 and restarted on the same ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from giftstream.server.embedded_redis import free_port
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET

GIFTSTREAM = [sys.executable, "-m", "giftstream.server.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GIFTSTREAM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class ServerProcess:
    """`giftstream serve` in a child process, ready when it logs its ready line. Its output
    is read to the end by a thread, so a chatty server never blocks on a full pipe.
    `host` and `prefix` run it elsewhere (`prefix=["ip", "netns", "exec", NS]`, on NS's
    address); without `host` the options and environment decide where it listens."""

    def __init__(
        self, data_dir: Path, *extra: str, host: str | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.host = host or "127.0.0.1"
        self.prefix = list(prefix)
        self.port = free_port()
        self.admin_port = free_port()
        self.args = [
            "serve",
            *(["--host", host, "--admin-host", host] if host else []),  # else the defaults
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--data-dir",
            str(data_dir),
            "--jwt-secret",
            JWT_SECRET,
            "--webhook-secret",
            WEBHOOK_SECRET,
            *extra,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 20) -> ServerProcess:
        self._ready.clear()
        self.proc = subprocess.Popen(
            [*self.prefix, *GIFTSTREAM, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError("server exited at start:\n" + "".join(self.log))
            if time.monotonic() > deadline:
                raise AssertionError("server not ready in time:\n" + "".join(self.log))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line)
            if "giftstream ready" in line:
                self._ready.set()

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the server and wait for it; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.running:
            self.stop(signal.SIGKILL)
