"""The internal API listens on its own address (--admin-host, default 127.0.0.1): opening
the WebSocket port to every interface (--host 0.0.0.0) does not open it. Shown on the real
`giftstream serve` by the sockets it listens on and by connecting over loopback: the whole
of 127.0.0.0/8 reaches a socket bound to 0.0.0.0, only 127.0.0.2 one bound there."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from tests.processes import ServerProcess


def listening(pid: int) -> dict[int, str]:
    """The address each TCP port the process listens on is bound to."""
    return {
        conn.laddr.port: conn.laddr.ip
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def healthz(host: str, port: int) -> int:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as response:
        return int(response.status)


@pytest.fixture
def loopback_alias() -> None:
    """127.0.0.2 is loopback too on Linux; skip where this host routes only 127.0.0.1."""
    with socket.socket() as server:
        try:
            server.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not an address of this host's loopback")
        server.listen()
        if not accepts("127.0.0.2", server.getsockname()[1]):
            pytest.skip("127.0.0.2 does not reach this host's loopback")


def test_host_0000_leaves_the_admin_api_on_loopback(
    tmp_path: Path, redis_url: str, loopback_alias: None
) -> None:
    server = ServerProcess(tmp_path / "data", "--redis-url", redis_url, "--host", "0.0.0.0")
    server.start()
    try:
        assert server.proc is not None
        bound = listening(server.proc.pid)
        assert bound[server.port] == "0.0.0.0"  # the WebSocket port, as asked
        assert bound[server.admin_port] == "127.0.0.1", bound
        assert accepts("127.0.0.2", server.port)
        assert not accepts("127.0.0.2", server.admin_port)
        assert healthz("127.0.0.1", server.admin_port) == 200
        ready = next(line for line in server.log if "giftstream ready" in line)
        assert f"admin=http://127.0.0.1:{server.admin_port} " in ready
    finally:
        server.stop()


def test_admin_host_from_the_environment(
    tmp_path: Path, redis_url: str, loopback_alias: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIFTSTREAM_ADMIN_HOST", "127.0.0.2")
    server = ServerProcess(tmp_path / "data", "--redis-url", redis_url).start()
    try:
        assert server.proc is not None
        bound = listening(server.proc.pid)
        assert (bound[server.port], bound[server.admin_port]) == ("127.0.0.1", "127.0.0.2")
        assert healthz("127.0.0.2", server.admin_port) == 200
        assert not accepts("127.0.0.1", server.admin_port)
        ready = next(line for line in server.log if "giftstream ready" in line)
        assert f"admin=http://127.0.0.2:{server.admin_port} " in ready
    finally:
        server.stop()
