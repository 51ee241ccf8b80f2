"""A local Redis (Valkey) Cluster for `dropserver dev --redis-cluster` and the tests.

Three primaries and three replicas (one replica per primary) on free loopback ports,
each a child of :class:`~dropserver.services.LocalServices` like its single Redis:
under ``setpriv --pdeathsig KILL`` and known to the reaper, so every node dies with
the parent and the temp dir goes with them however the parent dies. Each node has a
directory of its own (its ``nodes.conf``), so a node killed by a fault test and
started again rejoins the cluster as it would in production: a killed primary whose
replica was promoted comes back as a replica of it.

The cluster is built the way ``valkey-cli --cluster create`` builds one, from Python:
slots split in three ranges (CLUSTER ADDSLOTSRANGE), every node introduced to the
first (CLUSTER MEET), each replica told its primary (CLUSTER REPLICATE); ready when
every node reports ``cluster_state:ok`` and every replica's link to its primary is up.

Settings chosen for a development machine: ``cluster-node-timeout`` 2 s (a failover
takes ~2-4 s here; production keeps the 15 s default or its own), a replica may take
over however stale its link (``cluster-replica-validity-factor 0``), and a shard that
is down does not stop the other shards (``cluster-require-full-coverage no``).

:func:`cluster_url` is the ``redis+cluster://`` URL the client layer
(:mod:`dropserver.redis_client`) reads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from redis.crc import key_slot

if TYPE_CHECKING:  # pragma: no cover
    from dropserver.services import LocalServices

__all__ = [
    "CLUSTER_SLOTS",
    "ClusterNode",
    "build_cluster",
    "cluster_url",
    "node_command",
    "primary_for",
    "replica_of",
    "slot_of",
    "wait_cluster_ok",
]

CLUSTER_SLOTS = 16384
PRIMARIES = 3
REPLICAS_PER_PRIMARY = 1
NODE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class ClusterNode:
    name: str  # the service name in LocalServices ("redis-0" ... "redis-5")
    host: str
    port: int
    bus_port: int  # the cluster bus (not port + 10000: free ports may be above 55535)


def node_command(exe: str, node: ClusterNode, node_dir: str, *,
                 node_timeout_ms: int = NODE_TIMEOUT_MS) -> list[str]:
    """The server command line of one cluster node (no persistence: a restarted node
    comes back empty and resyncs from its primary)."""
    return [
        exe, "--bind", node.host, "--port", str(node.port), "--dir", node_dir,
        "--cluster-port", str(node.bus_port),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--maxmemory-policy", "noeviction", "--protected-mode", "no",
        "--loglevel", "warning", "--maxclients", "10000",
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-replica-validity-factor", "0",
        "--repl-diskless-sync-delay", "0",
        "--cluster-require-full-coverage", "no",
    ]


def cluster_url(nodes: Iterable[ClusterNode]) -> str:
    """``redis+cluster://h:p,h:p,...`` naming every node (any one is enough to start)."""
    return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in nodes)


def slot_of(key: str | bytes) -> int:
    """The cluster slot of ``key`` (its hash tag's, when it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def _client(node: ClusterNode) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_connect_timeout=2,
                       socket_timeout=5, decode_responses=True)


def _node_id(node: ClusterNode) -> str:
    with _client(node) as c:
        return c.execute_command("CLUSTER", "MYID")


def _wait(check, deadline: float, what: str) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"local cluster: {what} not reached in time"
                       + (f" ({last})" if last else ""))


def build_cluster(nodes: list[ClusterNode], *, deadline: float) -> None:
    """Assign slots, introduce the nodes, attach the replicas, wait until healthy.

    ``nodes``: the primaries first, then their replicas in the same order."""
    primaries, replicas = nodes[:PRIMARIES], nodes[PRIMARIES:]
    per = CLUSTER_SLOTS // len(primaries)
    for i, node in enumerate(primaries):
        first = i * per
        last = CLUSTER_SLOTS - 1 if i == len(primaries) - 1 else first + per - 1
        with _client(node) as c:
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
    with _client(nodes[0]) as c:
        for node in nodes[1:]:
            c.execute_command("CLUSTER", "MEET", node.host, node.port, node.bus_port)

    def all_known() -> bool:
        for node in nodes:
            with _client(node) as c:
                lines = c.execute_command("CLUSTER", "NODES").strip().splitlines()
                if len(lines) < len(nodes) or any("handshake" in ln for ln in lines):
                    return False
        return True

    _wait(all_known, deadline, "every node knowing every other")
    ids = [_node_id(p) for p in primaries]
    for i, node in enumerate(replicas):
        primary_id = ids[i % len(primaries)]
        # A replica may not know its primary's id yet at the first try: retried.
        _wait(lambda n=node, pid=primary_id: _replicate(n, pid), deadline,
              f"{node.name} replicating")
    wait_cluster_ok(nodes, deadline=deadline)


def _replicate(node: ClusterNode, primary_id: str) -> bool:
    with _client(node) as c:
        c.execute_command("CLUSTER", "REPLICATE", primary_id)
    return True


def wait_cluster_ok(nodes: Iterable[ClusterNode], *, deadline: float,
                    skip: Iterable[str] = ()) -> None:
    """Until every node (but those in ``skip``) says ``cluster_state:ok``, every
    replica's link to its primary is up, each of the 16384 slots has a primary (and,
    with every node up, a replica), every live node names the same primaries, and
    none of them a node in ``skip``.

    The last two matter right after a node is killed: until the others notice
    (``cluster-node-timeout``) they still say ``cluster_state:ok`` with the dead node
    as its slots' primary, and after the promotion the news reaches the nodes one
    gossip message at a time; "ok" alone is true before the failover has begun."""
    nodes = list(nodes)
    skipped = set(skip)
    live = [n for n in nodes if n.name not in skipped]
    gone = {n.port for n in nodes if n.name in skipped}

    def healthy() -> bool:
        views = set()
        for node in live:
            with _client(node) as c:
                if "cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
                info = c.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
                shards = c.execute_command("CLUSTER", "SLOTS")
                if sum(int(s[1]) - int(s[0]) + 1 for s in shards) != CLUSTER_SLOTS:
                    return False
                # Every primary with its replica, as every node sees it (not while a
                # node is down: its shard has one node then).
                if not skipped and any(len(s) < 3 + REPLICAS_PER_PRIMARY for s in shards):
                    return False
                primaries = frozenset((int(s[0]), int(s[1]), int(s[2][1])) for s in shards)
                if any(port in gone for *_, port in primaries):
                    return False
                views.add(primaries)
        return len(views) == 1

    _wait(healthy, deadline, "cluster_state:ok on every node")


def primary_for(services: LocalServices, key: str | bytes) -> ClusterNode:
    """The node that is primary for ``key``'s slot now (asked of the live nodes)."""
    slot = slot_of(key)
    for node in services.redis_nodes:
        if not services.is_running(node.name):
            continue
        try:
            with _client(node) as c:
                for first, last, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(first) <= slot <= int(last):
                        host, port = primary[0], int(primary[1])
                        for candidate in services.redis_nodes:
                            if candidate.port == port:
                                return candidate
                        raise LookupError(f"slot {slot} is served by {host}:{port}, "
                                          "not one of ours")
        except redis.RedisError:
            continue
    raise LookupError(f"no live node knows who serves slot {slot}")


def replica_of(services: LocalServices, primary: ClusterNode) -> ClusterNode:
    """A live replica of ``primary`` (asked of the replicas themselves)."""
    for node in services.redis_nodes:
        if node == primary or not services.is_running(node.name):
            continue
        with contextlib.suppress(redis.RedisError), _client(node) as c:
            info = c.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                return node
    raise LookupError(f"{primary.name} has no live replica")
