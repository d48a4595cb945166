"""Separate hosts on one machine: network namespaces, each joined by a veth pair to one bridge
in the root namespace, so a process in each has its own address and its own ports, and reaches
the root namespace (where Redis and the test's clients are) over a real link, not loopback."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from giftstream.server.embedded_redis import EmbeddedRedis


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """Run a command on this host."""
        return ["ip", "netns", "exec", self.namespace]


@dataclass(frozen=True)
class Network:
    bridge_address: str  # the root namespace's address on the bridge
    hosts: list[Host]


class BridgeRedis(EmbeddedRedis):
    """A redis-server on the bridge's address, for the other hosts: protected mode off (it
    only admits loopback clients when there is no password), on a bridge that has only this
    run's namespaces on it."""

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--protected-mode") + 1] = "no"
        return args


class NotPermitted(Exception):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        message = f"`ip {' '.join(args)}`: {done.stderr.strip()}"
        if "not permitted" in done.stderr.lower() or "permission denied" in done.stderr.lower():
            raise NotPermitted(message)
        raise RuntimeError(message)


def _free_subnet() -> str:
    """A 10.231.X.0/24 no interface of this machine has an address in."""
    used = subprocess.run(
        ["ip", "-o", "addr"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for _ in range(50):
        subnet = f"10.231.{secrets.randbelow(254) + 1}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.231.X.0/24 subnet in 50 tries")


@contextmanager
def hosts(count: int) -> Iterator[Network]:
    """`count` namespaces on one fresh bridge, unique names per run, all removed on exit;
    the test is skipped, saying why, where namespaces cannot be made (no root, no `ip`)."""
    if shutil.which("ip") is None:
        pytest.skip("separate hosts need the `ip` command (iproute2), which is not installed")
    tag = secrets.token_hex(2)
    bridge = f"gsb{tag}"
    subnet = _free_subnet()
    made: list[str] = []
    bridge_made = False
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except NotPermitted as exc:
            pytest.skip(f"separate hosts need network namespaces, not permitted here: {exc}")
        bridge_made = True
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        network = Network(f"{subnet}.1", [])
        for n in range(count):
            namespace, outside, inside = f"gs{tag}n{n}", f"gsv{tag}{n}", f"gsp{tag}{n}"
            try:
                _ip("netns", "add", namespace)
            except NotPermitted as exc:
                pytest.skip(f"separate hosts need `ip netns`, not permitted here: {exc}")
            made.append(namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            address = f"{subnet}.{10 + n}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            network.hosts.append(Host(namespace, address))
        yield network
    finally:
        for namespace in made:  # deleting a namespace deletes its veth end and so the pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        if bridge_made:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)
