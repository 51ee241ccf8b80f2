"""Several dropserver nodes behind HAProxy on this machine: the multi-node harness.

:class:`Cluster` starts, in this order:

1. a private network (:mod:`loadtest.netns`): a bridge, one network namespace per node;
2. Redis (or a Redis Cluster of 3 primaries and 3 replicas: ``redis_cluster``) and
   PostgreSQL on the bridge's address (:class:`dropserver.services.LocalServices`, the
   launcher of ``dropserver dev``), unless ``redis_url`` / ``database_url`` name
   servers the namespaces can reach; the schema;
3. ``nodes`` nodes, each ``dropserver serve --workers N`` inside its own namespace, on
   its own address, port 8000, with the rig's settings (fake payments, the dev token
   secret: :func:`dropserver.settings.unsafe_rig_env`);
4. HAProxy (:mod:`loadtest.balancer`, the configuration of docs/operations.md) on
   ``127.0.0.1``, checking every node's ``/readyz``. Viewers, buyers and the creator
   talk to the balancer only.

Faults are real: :meth:`Cluster.kill_node` freezes and SIGKILLs every process of a
node at once (its viewers' sockets close as after a crash), :meth:`Cluster.drain_node`
sends its ``serve`` SIGTERM (viewers get ``going_away``), :meth:`Cluster.start_node`
starts it again; :meth:`Cluster.kill_balancer` SIGKILLs one HAProxy process (its
viewers come back through the others). Everything started dies with the harness
however it ends: nodes and HAProxy by ``PR_SET_PDEATHSIG``, and a reaper process
deletes the namespaces and the bridge (``loadtest._netreaper``). Processes are
started from one thread the cluster keeps for that (the parent-death signal follows
the thread that forks), whichever thread calls. ``python -m loadtest cluster up``
(``loadtest.cluster_cli``) is this class as a command.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropserver.lifeline import die_with_parent
from dropserver.services import LocalServices, free_port
from dropserver.settings import unsafe_rig_env
from loadtest._netreaper import netns_pids, remove
from loadtest.balancer import Balancer
from loadtest.netns import Network, NetworkError, allocate

__all__ = ["NODE_PORT", "Cluster", "ClusterConfig", "ClusterError", "Node"]

NODE_PORT = 8000
# Settings every node runs with unless ``node_env`` says otherwise. A rig, not
# production: fake payments and the dev secret (the load kit signs tokens with it);
# every rehearsal viewer buys from one of a few loopback addresses, so the per-IP buy
# limit is off; a killed node's unconfirmed order entries are taken over after 5 s.
RIG_ENV = {
    "DROPSERVER_BUY_RATE_IP": "0",
    "DROPSERVER_ORDER_CLAIM_IDLE_MS": "5000",
    "DROPSERVER_SHUTDOWN_GRACE": "5",
    "DROPSERVER_LOG_LEVEL": "warning",
    "DROPSERVER_MAX_CONNECTIONS": "18000",
}


class ClusterError(RuntimeError):
    """The harness could not start, or a node did not do what it was told in time."""


@dataclass
class ClusterConfig:
    name: str = "default"
    nodes: int = 3
    workers: int = 1  # worker processes per node
    balancer_processes: int = 2  # HAProxy processes sharing the port (fd limit)
    port: int = 0  # the balancer's port on 127.0.0.1; 0: a free one
    redis_url: str = ""  # empty: a local Redis on the bridge
    redis_cluster: bool = False  # the local Redis: a Redis Cluster (3 primaries, 3 replicas)
    database_url: str = ""  # empty: a local PostgreSQL on the bridge
    node_env: dict[str, str] = field(default_factory=dict)  # on top of RIG_ENV
    run_dir: str = ""  # logs, configs, state; empty: <tmp>/dropserver-cluster/<name>


@dataclass
class Node:
    index: int
    name: str
    ip: str
    netns: str
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{NODE_PORT}"

    def pids(self) -> list[int]:
        """Every process of the node: ``serve`` and its workers."""
        return netns_pids(self.netns)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _reachable_from_namespaces(url: str, what: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        raise ClusterError(f"{what} {host} is loopback, which the nodes' namespaces do not "
                           "reach: give an address of this machine's network, or leave it "
                           "out to start one on the harness's bridge")


def _get(url: str, timeout: float = 1.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"{}")
        return exc.code, {}


class Cluster:
    """``with Cluster(ClusterConfig()) as c: c.base_url``: nodes, balancer, services."""

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        from tempfile import gettempdir

        self.run_dir = Path(self.config.run_dir or
                            Path(gettempdir()) / "dropserver-cluster" / self.config.name)
        self.network: Network | None = None
        self.services: LocalServices | None = None
        self.balancer: Balancer | None = None
        self.nodes: list[Node] = []
        self.redis_url = self.config.redis_url
        self.database_url = self.config.database_url
        self._reaper: subprocess.Popen | None = None
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, "cluster-spawner")
        self.started_at: float | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> Cluster:
        try:
            self._spawner.submit(self._start, timeout).result()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        cfg = self.config
        deadline = time.monotonic() + timeout
        if os.geteuid() != 0:  # before anything is started
            raise NetworkError("the cluster harness makes network namespaces: run it as root")
        if self.redis_url:
            _reachable_from_namespaces(self.redis_url, "REDIS_URL")
        if self.database_url:
            _reachable_from_namespaces(self.database_url, "DATABASE_URL")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "media").mkdir(exist_ok=True)
        self._start_reaper()
        self.network = allocate(self._register)
        net = self.network
        if not (self.redis_url and self.database_url):
            self.services = LocalServices(
                want_redis=not self.redis_url, want_postgres=not self.database_url,
                redis_cluster=cfg.redis_cluster, host=net.hub_ip,
                client_networks=(str(net.subnet),)).start()
            self.redis_url = self.redis_url or self.services.redis_url
            self.database_url = self.database_url or self.services.database_url
        from dropserver.db import migrate_database

        asyncio.run(migrate_database(self.database_url))
        for i in range(1, cfg.nodes + 1):
            ns = net.add_node(i)
            self.nodes.append(Node(i, f"node{i}", net.node_ip(i), ns,
                                   self.run_dir / f"node{i}.log"))
        for node in self.nodes:
            self._spawn_node(node)
        for node in self.nodes:
            self._wait_node(node, deadline)
        port = cfg.port or free_port("127.0.0.1")
        self.balancer = Balancer(self.run_dir, "127.0.0.1", port,
                                 [(n.name, f"{n.ip}:{NODE_PORT}") for n in self.nodes],
                                 processes=cfg.balancer_processes)
        self.balancer.start()
        for node in self.nodes:
            self.balancer.wait_status(node.name, up=True,
                                      timeout=max(1.0, deadline - time.monotonic()))
        self.started_at = time.time()

    def stop(self) -> None:
        """Everything down: HAProxy, the nodes (drained), the services, the network."""
        if self.balancer is not None:
            self.balancer.stop()
            self.balancer = None
        for node in self.nodes:
            if node.running():
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        if self.network is not None:
            remove(self.network.resources())  # what is left in the namespaces, then them
            self.network = None
        if self.services is not None:
            self.services.stop()
            self.services = None
        if self._reaper is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=15)
            self._reaper = None
        self._spawner.shutdown(wait=False)

    def _start_reaper(self) -> None:
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "loadtest._netreaper"], stdin=subprocess.PIPE,
            start_new_session=True, close_fds=True)

    def _register(self, kind: str, name: str) -> None:
        assert self._reaper is not None and self._reaper.stdin is not None
        self._reaper.stdin.write(f"{kind} {name}\n".encode())
        self._reaper.stdin.flush()

    # -- nodes ----------------------------------------------------------------------------
    def node_env(self, node: Node) -> dict[str, str]:
        assert self.network is not None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DROPSERVER_", "PROMETHEUS_", "STRIPE_"))
               and k not in ("REDIS_URL", "DATABASE_URL", "FORWARDED_ALLOW_IPS")}
        env.update({
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            **unsafe_rig_env(),
            **RIG_ENV,
            "DROPSERVER_HOST": node.ip,
            "DROPSERVER_PORT": str(NODE_PORT),
            "DROPSERVER_WORKERS": str(self.config.workers),
            "DROPSERVER_NODE_ID": node.name,
            # The nodes share one media folder (on real nodes: a shared volume) and
            # trust the balancer's X-Forwarded-For (uvicorn's proxy headers).
            "DROPSERVER_MEDIA_DIR": str(self.run_dir / "media"),
            "FORWARDED_ALLOW_IPS": self.network.hub_ip,
        })
        env.update(self.config.node_env)
        return env

    def _spawn_node(self, node: Node) -> None:
        assert self.network is not None
        log = open(node.log_path, "ab")
        try:
            node.proc = subprocess.Popen(
                # -P: PYTHONPATH in node_env picks the checkout that serves.
                [*self.network.exec_prefix(node.index), sys.executable, "-P", "-m",
                 "dropserver.cli", "serve"],
                env=self.node_env(node), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=die_with_parent(signal.SIGTERM))
        finally:
            log.close()

    def _wait_node(self, node: Node, deadline: float) -> None:
        """Until ``/readyz`` answers 200 and every worker of the node runs."""
        while True:
            if node.proc is None or node.proc.poll() is not None:
                raise ClusterError(f"{node.name} exited ({node.proc and node.proc.returncode})"
                                   f": {self.log_tail(node)}")
            with contextlib.suppress(OSError):
                status, _ = _get(node.url + "/readyz")
                if status == 200 and len(node.pids()) >= self.config.workers + 1:
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} not ready in time: {self.log_tail(node)}")
            time.sleep(0.1)

    def node(self, which: int | str) -> Node:
        """A node by index (1-based) or name (``node2``, ``2``)."""
        key = str(which).removeprefix("node")
        for node in self.nodes:
            if str(node.index) == key:
                return node
        raise ClusterError(f"no node {which!r} (nodes: "
                           f"{', '.join(n.name for n in self.nodes)})")

    def kill_node(self, which: int | str) -> float:
        """Every process of the node stopped (SIGSTOP) then SIGKILLed: a crash, no
        ``going_away``, no drain. Returns the monotonic time of the kill."""
        node = self.node(which)
        pids = node.pids()
        for pid in pids:  # frozen first: no worker drains when its supervisor goes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        at = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while node.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        return at

    def drain_node(self, which: int | str, wait: bool = False) -> float:
        """SIGTERM to the node's ``serve``: its workers stop accepting, tell every
        viewer ``going_away`` and stop. Returns the monotonic time of the signal."""
        node = self.node(which)
        if not node.running():
            raise ClusterError(f"{node.name} is not running")
        at = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        if wait:
            node.proc.wait(timeout=30)  # type: ignore[union-attr]
        return at

    def start_node(self, which: int | str, timeout: float = 60.0) -> None:
        """Start a stopped node again (same namespace, address and name)."""
        node = self.node(which)
        if node.running():
            raise ClusterError(f"{node.name} is running")
        self._spawner.submit(self._spawn_node, node).result()
        self._wait_node(node, time.monotonic() + timeout)

    def kill_balancer(self, k: int = 1) -> float:
        """SIGKILL HAProxy process ``k`` (of ``balancer_processes``): its viewers'
        sockets close and they come back through the others (on real machines: the
        other balancer behind the virtual IP or DNS name). Monotonic time of the kill."""
        assert self.balancer is not None
        return self.balancer.kill_process(k)

    def start_balancer(self, k: int = 1) -> None:
        """HAProxy process ``k`` again, started from the cluster's spawner thread."""
        assert self.balancer is not None
        self._spawner.submit(self.balancer.start_process, k).result()

    # -- where to connect -----------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/ws"

    def log_tail(self, node: Node, n: int = 2000) -> str:
        try:
            return node.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def status(self) -> dict[str, Any]:
        """Each node as its process and every HAProxy process see it, and the URLs."""
        states = self.balancer.states() if self.balancer else []
        nodes = []
        for node in self.nodes:
            ready: Any
            try:
                code, body = _get(node.url + "/readyz")
                ready = "ready" if code == 200 else (body.get("status") or code)
            except OSError as exc:
                ready = f"unreachable ({type(exc).__name__})"
            nodes.append({
                "name": node.name, "address": f"{node.ip}:{NODE_PORT}", "netns": node.netns,
                "pids": node.pids(), "readyz": ready,
                "balancer": [s.get(node.name, {}).get("status", "?") for s in states],
                "connections": sum(int(s.get(node.name, {}).get("scur") or 0)
                                   for s in states),
            })
        return {"name": self.config.name, "balancer": self.base_url if self.balancer else None,
                "ws": self.ws_url if self.balancer else None, "redis_url": self.redis_url,
                "database_url": self.database_url, "run_dir": str(self.run_dir),
                "subnet": str(self.network.subnet) if self.network else None,
                "balancer_processes": self.config.balancer_processes, "nodes": nodes}

    def resources(self) -> list[tuple[str, str]]:
        return self.network.resources() if self.network else []
