"""The local Redis Cluster of `dropserver dev --redis-cluster` and the tests
(dropserver.local_cluster): its shape, its failover, and that it dies with its parent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from dropserver import local_cluster
from dropserver.redis_client import cluster_nodes, connect_sync
from tests.test_cli import _assert_gone, _dev_env, _in_tree, _tree, _wait_line


def _role(node) -> str:
    with redis.Redis(host=node.host, port=node.port, decode_responses=True) as c:
        return c.info("replication")["role"]


def test_three_primaries_three_replicas_every_slot_served(cluster):
    assert len(cluster.redis_nodes) == 6
    roles = sorted(_role(n) for n in cluster.redis_nodes)
    assert roles == ["master"] * 3 + ["slave"] * 3
    with redis.Redis(host=cluster.redis_nodes[0].host, port=cluster.redis_nodes[0].port,
                     decode_responses=True) as c:
        shards = c.execute_command("CLUSTER", "SLOTS")
    assert sum(int(last) - int(first) + 1 for first, last, *_ in shards) == 16384
    assert all(len(shard) == 4 for shard in shards)  # range, primary, one replica
    hosts, _ = cluster_nodes(cluster.redis_url)
    assert sorted(p for _, p in hosts) == sorted(n.port for n in cluster.redis_nodes)


def test_a_drop_lives_on_one_slot_and_a_client_reaches_it(cluster):
    from checkout import keys
    from realtime import channels

    d = 42
    names = [keys.meta(d), keys.product(d, 1), keys.hold(d, "h"), keys.orders(d),
             keys.expiry(d), keys.idem(d), channels.history_key(d), channels.meta_key(d),
             channels.drop_channel(d), channels.chat_key(d, "recent")]
    assert len({local_cluster.slot_of(k) for k in names}) == 1
    client = connect_sync(cluster.redis_url)
    try:
        client.set(keys.meta(d), "x")
        assert client.get(keys.meta(d)) == b"x"
    finally:
        client.close()


@pytest.mark.slow
def test_a_killed_primary_is_replaced_by_its_replica_and_rejoins_as_replica(cluster):
    key = "{drop:7}:sale"
    client = connect_sync(cluster.redis_url)
    try:
        client.set(key, "before")
        client.wait(1, 2000)
        old = local_cluster.primary_for(cluster, key)
        cluster.stop_service(old.name, kill=True)
        # Until every live node names another primary for the slot: right after the
        # kill the others still say cluster_state:ok with the dead node in charge.
        local_cluster.wait_cluster_ok(cluster.redis_nodes, skip=[old.name],
                                      deadline=time.monotonic() + 30)
        new = local_cluster.primary_for(cluster, key)
        assert new != old
        assert client.get(key) == b"before"  # replicated before the kill (WAIT 1)
        cluster.start_service(old.name)
        local_cluster.wait_cluster_ok(cluster.redis_nodes, deadline=time.monotonic() + 30)
        assert _role(old) == "slave" and local_cluster.primary_for(cluster, key) == new
    finally:
        client.close()


def test_services_with_a_cluster_killed_with_sigkill_leave_nothing_behind():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "services", "--redis-cluster"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_dev_env())
    try:
        line = proc.stdout.readline()
        urls = json.loads(line)
        assert urls["REDIS_URL"].startswith("redis+cluster://")
        hosts, _ = cluster_nodes(urls["REDIS_URL"])
        assert len(hosts) == 6
        client = connect_sync(urls["REDIS_URL"])
        try:
            assert client.ping()
        finally:
            client.close()
        tree = _tree(proc.pid)
        nodes = {port: _in_tree(tree, f"127.0.0.1:{port}") for _, port in hosts}
        assert all(nodes.values()), f"a cluster node was not found: {nodes}"
        root = Path(nodes[hosts[0][1]][0].cwd()).parent
        assert root.name.startswith("dropserver-") and root.exists()
        tree.update(_tree(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _assert_gone(tree, root)


@pytest.mark.slow
def test_dev_with_a_cluster_serves_and_leaves_nothing_behind_when_killed():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "dev", "--redis-cluster", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_dev_env())
    try:
        line = _wait_line(proc, r"HTTP\s+http://", 60)
        base = line.split()[-1]
        with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "ready" and body["checks"]["redis"] == "ok"
        rline = _wait_line(proc, r"Redis\s+redis\+cluster://", 5)
        hosts, _ = cluster_nodes(rline.split()[-1])
        tree = _tree(proc.pid)
        nodes = {port: _in_tree(tree, f"127.0.0.1:{port}") for _, port in hosts}
        assert all(nodes.values()), f"a cluster node was not found: {nodes}"
        root = Path(nodes[hosts[0][1]][0].cwd()).parent
        assert root.name.startswith("dropserver-")
        tree.update(_tree(proc.pid))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _assert_gone(tree, root)
