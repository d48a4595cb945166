"""`giftstream serve --workers N`: one port served by N processes, and the supervisor that
keeps them.

The supervisor serves nothing itself. It reserves the two ports, starts the embedded Redis
once (unless `--redis-url`), then spawns N workers: each a whole single-process server
(`App`) on the same settings, secrets and Redis, listening on the shared ports with
SO_REUSEPORT, so the kernel spreads new connections over them. A worker that dies, even
by kill -9, is started again after a backoff, within a cap of restarts a minute; SIGTERM or
SIGINT drains every worker as one server drains, then stops the Redis it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from giftstream.server.config import ConfigError, Settings, redact_url
from giftstream.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError

log = logging.getLogger("giftstream.workers")

MAX_WORKERS = 256
RESTART_WINDOW_S = 60.0
MAX_RESTARTS_PER_WINDOW = 5  # a worker dying more often than this a minute stops the service
BACKOFF_FIRST_S = 0.5  # doubled for each earlier death in the window
BACKOFF_MAX_S = 10.0
DRAIN_MARGIN_S = 10.0  # beyond a worker's own drain time, before it is killed
Hook = Callable[[Any], object]  # called with the worker's App once it serves


def parse_workers(text: str) -> int:
    """`--workers`: a count, or `auto` / `0` for one per core."""
    if text.strip().lower() in ("auto", "0"):
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        count = -1
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"must be a whole number from 0 to {MAX_WORKERS}, or auto")
    return count


@dataclass
class RestartPolicy:
    """When to start a dead worker again: at once-ish, then slower as it keeps dying, and
    never more than `limit` times a window, so a crash loop cannot spin."""

    limit: int = MAX_RESTARTS_PER_WINDOW
    window_s: float = RESTART_WINDOW_S
    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    deaths: deque[float] = field(default_factory=deque)

    def after_death(self, now: float) -> float | None:
        """Seconds to wait before the restart, or None: it died too often, give up."""
        while self.deaths and self.deaths[0] <= now - self.window_s:
            self.deaths.popleft()
        if len(self.deaths) >= self.limit:
            return None
        self.deaths.append(now)
        delay: float = self.first_s * 2.0 ** (len(self.deaths) - 1)
        return min(delay, self.max_s)


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """What a worker tells the supervisor once it serves."""

    index: int
    pid: int
    gateway_id: str
    ws_url: str
    admin_url: str


@dataclass(frozen=True, slots=True)
class ServiceReady:
    """What the service is, once every worker serves: for `--demo`'s block."""

    ws_url: str
    admin_url: str
    redis_url: str
    embedded_redis: bool
    workers: tuple[WorkerReady, ...]


# ---- the worker process -----------------------------------------------------------------


def worker_main(
    index: int, settings: Settings, log_level: str, on_ready: Hook | None, ready: Connection
) -> None:
    """A worker: one ordinary server, until SIGTERM (from the supervisor) or until the
    supervisor is gone (killed -9: its workers then drain and exit, not serve orphaned)."""
    import uvloop

    from giftstream.server.app import StartupError, serve_until_signalled
    from giftstream.server.money.catalog import load_catalog

    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor alone, which drains in order
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [worker {index + 1}] %(name)s: %(message)s",
    )

    async def serving(app: Any) -> None:
        if on_ready is not None:
            result = on_ready(app)
            if hasattr(result, "__await__"):
                await result
        _stop_when_parent_dies()
        ready.send(WorkerReady(index, os.getpid(), app.gateway_id, app.ws_url, app.admin_url))

    try:
        uvloop.run(serve_until_signalled(settings, load_catalog(settings.catalog), serving))
    except StartupError as exc:
        print(f"giftstream: error: worker {index + 1}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _stop_when_parent_dies() -> None:
    """SIGTERM ourselves (the normal drain) when the supervisor's end of the spawn pipe
    closes, which the kernel does however the supervisor ends."""
    import asyncio

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    loop = asyncio.get_running_loop()
    sentinel = parent.sentinel

    def gone() -> None:
        loop.remove_reader(sentinel)
        log.warning("the supervisor is gone: draining")
        os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(sentinel, gone)


# ---- the supervisor ---------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker's place: the process in it now, and its restart history."""

    index: int
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    process: BaseProcess | None = None
    ready_pipe: Connection | None = None
    ready: WorkerReady | None = None
    restart_at: float | None = None


class Supervisor:
    """Runs N workers on one port until signalled; `run()` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        log_level: str = "INFO",
        worker_on_ready: Hook | None = None,
        on_all_ready: Callable[[ServiceReady], object] | None = None,
    ) -> None:
        self.settings = settings
        self.log_level = log_level
        self.worker_on_ready = worker_on_ready  # run by the first worker only
        self.on_all_ready = on_all_ready
        self.context = multiprocessing.get_context("spawn")  # no forked event loop or locks
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.embedded_redis: EmbeddedRedis | None = None
        self.announced = False
        self._reserved: list[socket.socket] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._signalled: int | None = None

    def run(self) -> int:
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signum
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    def _run(self) -> int:
        try:
            self._reserve_ports()
            self.settings = self._with_redis(self.settings)
        except (ConfigError, OSError, EmbeddedRedisError) as exc:
            print(f"giftstream: error: {exc}", file=sys.stderr, flush=True)
            return 1
        self._start(self.slots[0])  # alone first: a bad Redis or catalog fails once, clearly
        while True:
            code = self._step()
            if code is not None:
                return self._drain(code)

    # ---- start ------------------------------------------------------------------------

    def _reserve_ports(self) -> None:
        """Refuse ports something listens on (another server, or another `--workers`
        service, which SO_REUSEPORT would otherwise silently join), then hold them bound,
        not listening, for our life: port 0 becomes one port all workers share."""
        settings = self.settings
        port = self._reserve(settings.host, settings.port, "--port")
        admin_port = self._reserve(settings.admin_host, settings.admin_port, "--admin-port")
        self.settings = dataclasses.replace(settings, port=port, admin_port=admin_port)

    def _reserve(self, host: str, port: int, flag: str) -> int:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({flag}): {exc}") from exc
        for family, kind, proto, _, address in infos:
            for reuse_port in (False, True):  # the check, then the reservation
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    sock.bind((address[0], port, *address[2:]))
                except OSError as exc:
                    sock.close()
                    raise ConfigError(
                        f"cannot listen on {host}:{port} ({flag}): {exc.strerror or exc}"
                    ) from exc
                port = int(sock.getsockname()[1])  # 0 asked: the port the OS chose
                if reuse_port:
                    self._reserved.append(sock)
                else:
                    sock.close()
        return port

    def _with_redis(self, settings: Settings) -> Settings:
        """One Redis for every worker: --redis-url, or the data dir's embedded one."""
        if settings.redis_url is not None:
            return settings
        try:
            self.embedded_redis = EmbeddedRedis(settings.data_dir / "redis").start()
        except EmbeddedRedisError as exc:
            raise EmbeddedRedisError(f"embedded Redis: {exc}") from exc
        return dataclasses.replace(settings, redis_url=self.embedded_redis.url)

    def _start(self, slot: _Slot) -> None:
        receive, send = self.context.Pipe(duplex=False)
        hook = self.worker_on_ready if slot.index == 0 else None
        process = self.context.Process(
            target=worker_main,
            args=(slot.index, self.settings, self.log_level, hook, send),
            name=f"giftstream-worker-{slot.index + 1}",
        )
        process.start()
        send.close()  # the worker's end: ours closed, so its death reads as EOF
        slot.process, slot.ready_pipe, slot.ready, slot.restart_at = process, receive, None, None
        log.info("worker %d starting (pid %s)", slot.index + 1, process.pid)

    # ---- run --------------------------------------------------------------------------

    def _step(self) -> int | None:
        """Wait for one thing to happen and handle it; an exit code once we must stop."""
        waiting: dict[Any, tuple[str, _Slot | None]] = {self._wake_r: ("signal", None)}
        for slot in self.slots:
            if slot.process is not None:
                waiting[slot.process.sentinel] = ("exit", slot)
            if slot.ready_pipe is not None:
                waiting[slot.ready_pipe] = ("ready", slot)
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        for item in multiprocessing.connection.wait(list(waiting), timeout):
            what, owner = waiting[item]
            if what == "signal":
                self._drain_wake_pipe()
                name = signal.Signals(self._signalled or signal.SIGTERM).name
                log.info("%s: draining %d workers", name, self._live())
                return 0
            assert owner is not None  # stale items: an exit already closed the pipe
            if what == "ready" and owner.ready_pipe is item:
                self._on_ready(owner)
            elif what == "exit" and owner.process is not None and owner.process.sentinel == item:
                if (code := self._on_exit(owner)) is not None:
                    return code
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)
        return None

    def _on_ready(self, slot: _Slot) -> None:
        assert slot.ready_pipe is not None
        try:
            slot.ready = slot.ready_pipe.recv()
        except (EOFError, OSError):  # it died before saying so; its exit is handled apart
            slot.ready_pipe.close()
            slot.ready_pipe = None
            return
        if self.announced:
            log.info("worker %d serving again (pid %s)", slot.index + 1, slot.ready.pid)
        elif slot.index == 0:
            for other in self.slots[1:]:
                self._start(other)
        if not self.announced and all(s.ready is not None for s in self.slots):
            self._announce()

    def _announce(self) -> None:
        self.announced = True
        first = self.slots[0].ready
        assert first is not None and self.settings.redis_url is not None
        workers = tuple(s.ready for s in self.slots if s.ready is not None)
        log.info(
            "giftstream ready: ws=%s admin=%s redis=%s ledger=%s workers=%d pids=%s",
            first.ws_url,
            first.admin_url,
            redact_url(self.settings.redis_url),
            self.settings.ledger_key,
            len(workers),
            ",".join(str(w.pid) for w in workers),
        )
        if self.on_all_ready is not None:
            self.on_all_ready(
                ServiceReady(
                    ws_url=first.ws_url,
                    admin_url=first.admin_url,
                    redis_url=self.settings.redis_url,
                    embedded_redis=self.embedded_redis is not None,
                    workers=workers,
                )
            )

    def _on_exit(self, slot: _Slot) -> int | None:
        """A worker ended without being asked: restart it, or stop all (an exit code)."""
        assert slot.process is not None
        process = slot.process
        process.join()  # at once: its sentinel says it ended; this reads its exit code
        how = _how_it_ended(process)
        process.close()
        if slot.ready_pipe is not None:
            slot.ready_pipe.close()
        slot.process = slot.ready_pipe = slot.ready = None
        if not self.announced:
            log.error("worker %d %s while starting: stopping", slot.index + 1, how)
            return 1
        delay = slot.policy.after_death(time.monotonic())
        if delay is None:
            log.error(
                "worker %d %s, its %s death within %.0f s: not restarting it; stopping",
                slot.index + 1,
                how,
                _ordinal(slot.policy.limit + 1),
                slot.policy.window_s,
            )
            return 1
        log.warning("worker %d %s: restarting it in %.1f s", slot.index + 1, how, delay)
        slot.restart_at = time.monotonic() + delay
        return None

    def _drain_wake_pipe(self) -> None:
        os.set_blocking(self._wake_r, False)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 64):
                pass

    def _live(self) -> int:
        return sum(1 for slot in self.slots if slot.process is not None)

    # ---- stop -------------------------------------------------------------------------

    def _drain(self, code: int) -> int:
        """SIGTERM to every worker (each drains as one server does), wait, kill what is
        left past the deadline, then stop the Redis we started."""
        limits = self.settings.limits
        timeout = limits.shutdown_grace_s + 2 * limits.close_timeout_s + DRAIN_MARGIN_S
        live = [slot.process for slot in self.slots if slot.process is not None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error(
                    "worker pid %s did not drain within %.0f s: killing it", process.pid, timeout
                )
                process.kill()
                process.join()
                code = code or 1
            elif process.exitcode != 0:
                log.warning("worker pid %s %s while draining", process.pid, _how_it_ended(process))
        for slot in self.slots:
            slot.process = None
        if self.embedded_redis is not None:
            self.embedded_redis.stop()
            self.embedded_redis = None
        log.info("giftstream stopped (%d workers)", len(live))
        return code

    def _release(self) -> None:
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        for slot in self.slots:
            if slot.ready_pipe is not None:
                slot.ready_pipe.close()
                slot.ready_pipe = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.embedded_redis is not None:  # reached only when starting failed half-way
            self.embedded_redis.stop()
            self.embedded_redis = None


def _how_it_ended(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
