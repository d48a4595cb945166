"""A `giftstream consume` or `giftstream relay` process for the tests: its log (stderr) read
to the end by a thread, so the pipe never fills, and waited on with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from tests.processes import GIFTSTREAM


class WorkerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = args[0]
        self.proc = subprocess.Popen(
            [*GIFTSTREAM, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.log))

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.said(text):
            assert self.proc.poll() is None, f"{self.name} exited:\n" + "".join(self.log)
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(self.log)
            time.sleep(0.02)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, and its exit code once it has exited (and its log is read)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
