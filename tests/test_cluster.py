"""The multi-node harness (loadtest.cluster): 3 nodes, each in its own network
namespace, behind HAProxy, over one Redis and one PostgreSQL.

Faults are real: a node's processes are SIGKILLed mid-drop, or its ``serve`` gets
SIGTERM (a drain). A whole rehearsal runs through the balancer each time; it judges
the viewers (every one back and caught up, no event lost) and the invariants of the
drop are checked afterwards (tests/invariants.py). The harness itself must leave
nothing behind, even when it is SIGKILLed.

The multi-node tests need root (network namespaces), iproute2 and HAProxy (Debian's
package; .ci/run installs it) and are skipped where one is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtest.balancer import TEMPLATE, find_haproxy, render
from loadtest.fault import Fault, judge, recovery
from loadtest.rehearse import RehearsalConfig, rehearse

ROOT = Path(__file__).resolve().parents[1]

_missing = [what for what, ok in (
    ("root", os.geteuid() == 0),
    ("haproxy", shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()),
    ("ip (iproute2)", shutil.which("ip")),
    ("setpriv", shutil.which("setpriv"))) if not ok]
needs_namespaces = pytest.mark.skipif(
    bool(_missing), reason=f"the cluster harness needs {', '.join(_missing)}")


# -- the template and the judge (no cluster) ------------------------------------------------

def test_the_template_renders_and_haproxy_accepts_it(tmp_path: Path) -> None:
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        pytest.skip("haproxy is not installed")
    text = render(bind="127.0.0.1:9", servers=[("node1", "10.0.0.11:8000"),
                                               ("node2", "10.0.0.12:8000")],
                  maxconn=1000, stats_socket=str(tmp_path / "s.sock"))
    assert "$" not in text  # every field filled
    assert "    server node1 10.0.0.11:8000\n    server node2 10.0.0.12:8000" in text
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run([find_haproxy(), "-c", "-f", str(cfg)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # A template with a field left out is refused, not half filled.
    with pytest.raises(KeyError):
        render(bind="127.0.0.1:9", servers=[], maxconn=1, stats_socket="x",
               template=TEMPLATE.read_text() + "\n# ${unknown}\n")


def test_the_operations_guide_shows_the_template_the_harness_runs() -> None:
    """docs/operations.md quotes loadtest/haproxy.cfg whole: one configuration, tested."""
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert TEMPLATE.read_text().strip() in guide


def _record(at: float = 100.0) -> dict[str, Any]:
    return {"what": "kill node2", "at": at, "done": at + 0.2, "exit": 0, "output": "",
            "took_s": 0.2}


def test_recovery_counts_only_outages_from_the_fault_on() -> None:
    reports = [{"outages": [[50.0, 51.0, True, False],     # before the fault: not counted
                            [100.01, 102.5, True, False],
                            [100.02, 104.0, False, False]],
                "totals": {"down_at_report": 0, "buy_retries": 1}},
               {"outages": [[100.0, 103.0, True, True]], "totals": {"buy_retries": 2}}]
    rec = recovery(reports, _record(), budget_s=10.0, t0=90.0)
    assert (rec["outages"], rec["recovered"], rec["snapshot"], rec["announced"]) == (3, 2, 1, 1)
    assert rec["last_back_s"] == 4.0 and rec["at_s"] == 10.0 and rec["buy_retries"] == 3
    assert judge(rec) == []
    late = recovery(reports, _record(), budget_s=3.5, t0=90.0)
    assert judge(late) == ["the last viewer was back 4.0 s after the fault, over the "
                           "4 s budget"]


def test_judge_fails_a_fault_that_did_nothing_or_left_viewers_down() -> None:
    quiet = recovery([{"outages": [], "totals": {}}], _record(), 10.0, 90.0)
    assert judge(quiet) == ["the fault `kill node2` closed no viewer's socket"]
    stuck = recovery([{"outages": [[100.1, 101.0, True, False]],
                       "totals": {"down_at_report": 4}}], _record(), 10.0, 90.0)
    assert judge(stuck) == ["4 viewers never came back after the fault"]
    failed = recovery([{"outages": [], "totals": {}}],
                      {**_record(), "exit": 1, "output": "no node"}, 10.0, 90.0)
    assert "failed (exit 1)" in judge(failed)[0]


def test_the_harness_says_it_needs_root_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from loadtest.cluster import Cluster, ClusterConfig
    from loadtest.netns import NetworkError

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cluster = Cluster(ClusterConfig(name="t-noroot", run_dir=str(tmp_path)))
    with pytest.raises(NetworkError, match="run it as root"):
        cluster.start()
    assert cluster.network is None and cluster.services is None
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


# -- three nodes behind HAProxy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loadtest.cluster import Cluster, ClusterConfig

    run_dir = tmp_path_factory.mktemp("cluster")
    with Cluster(ClusterConfig(name=f"t{uuid.uuid4().hex[:6]}", nodes=3, workers=1,
                               balancer_processes=2, run_dir=str(run_dir))) as c:
        yield c


def _rehearse_with(cluster: Any, fault: Fault, out: Path) -> dict[str, Any]:
    from loadtest.target import ClusterTarget

    # A rush spread over 1.5 s: the fault strikes with buys in flight.
    cfg = RehearsalConfig(
        viewers=300, stock=30, swarm_processes=2, connect_rate=400, buy_probability=0.5,
        buy_delay_ms=(0, 1500), chat_messages=0, countdown_s=1.0, probe_interval_s=0,
        floor=False, rush_timeout_s=40, max_duration_s=150, out_dir=str(out),
        quiet=True, p99_budget_ms=10000, command="test", fault=fault)
    return asyncio.run(rehearse(cfg, target=ClusterTarget(cluster)))


def _check_invariants(cluster: Any, result: dict[str, Any]) -> None:
    """Every hold a buyer was told of has its one order row, nothing oversold, Redis
    and PostgreSQL agree (tests/invariants.py), once the order stream is quiet."""
    from benchmarks.balancer import drop_violations

    assert asyncio.run(drop_violations(cluster.database_url, cluster.redis_url,
                                       result)) == []


def _node_back(cluster: Any, which: int) -> None:
    cluster.start_node(which)
    cluster.balancer.wait_status(f"node{which}", up=True, timeout=30)


def _assert_everyone_back(result: dict[str, Any]) -> dict[str, Any]:
    assert result["failures"] == [] and result["passed"] is True, result["failures"]
    fault = result["fault"]
    assert fault["exit"] == 0 and fault["outages"] > 0 and fault["still_down"] == 0
    assert fault["recovered"] + fault["snapshot"] == fault["outages"]
    assert fault["last_back_s"] <= fault["budget_s"]
    pos = result["positions"]
    assert pos["lost"] == 0 and pos["out_of_order"] == 0 and pos["gaps"] == 0
    assert result["connections"]["joined"] == 300 and result["buy_now"]["seen"] == 300
    assert result["audit"]["oversold"] == 0 and result["reservations"]["held"] == 30
    return fault


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_node_killed_mid_drop_costs_no_event_and_no_hold(cluster: Any,
                                                           tmp_path: Path) -> None:
    assert [s["node2"]["status"] for s in cluster.balancer.states()] == ["UP", "UP"]
    result = _rehearse_with(cluster, Fault(after_s=0.3, action=lambda: cluster.kill_node(2),
                                           budget_s=10.0), tmp_path)
    fault = _assert_everyone_back(result)
    # A crash: nobody was told; roughly a third of the viewers were on node2.
    assert fault["announced"] == 0 and 40 <= fault["outages"] <= 200
    assert not cluster.node(2).running() and cluster.node(2).pids() == []
    # Both HAProxy processes took node2 out of the rotation on their own.
    assert all(s["node2"]["status"] != "UP" for s in cluster.balancer.states())
    _check_invariants(cluster, result)
    _node_back(cluster, 2)


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_node_drained_mid_drop_tells_its_viewers_going_away(cluster: Any,
                                                              tmp_path: Path) -> None:
    if not cluster.node(2).running():
        _node_back(cluster, 2)
    result = _rehearse_with(
        cluster, Fault(after_s=0.3, action=lambda: cluster.drain_node(2, wait=True),
                       budget_s=10.0), tmp_path)
    fault = _assert_everyone_back(result)
    # A drain: every viewer of node2 got going_away before its socket closed.
    assert fault["announced"] == fault["outages"] and fault["outages"] >= 40
    assert result["connections"]["closes"].get("1012 service restart") == fault["outages"]
    assert cluster.node(2).proc.returncode == 0  # a clean stop
    _check_invariants(cluster, result)
    _node_back(cluster, 2)
    # Back in the rotation and taking viewers: the rehearsal's last check of /readyz
    # through the balancer, node by node.
    assert all(s["node2"]["status"] == "UP" for s in cluster.balancer.states())


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_balancer_process_killed_mid_drop_its_viewers_come_back_through_the_other(
        cluster: Any, tmp_path: Path) -> None:
    """Two HAProxy processes share the port, as two balancers share a virtual IP: one
    SIGKILLed, its viewers' sockets close and they rejoin through the other."""
    for which in (1, 2, 3):
        if not cluster.node(which).running():
            _node_back(cluster, which)

    def kill_balancer1() -> float:
        return cluster.kill_balancer(1)

    result = _rehearse_with(cluster, Fault(after_s=0.3, action=kill_balancer1,
                                           budget_s=10.0), tmp_path)
    fault = _assert_everyone_back(result)
    # The kernel spread the viewers over both processes; every node kept running.
    assert fault["announced"] == 0 and 40 <= fault["outages"] <= 260
    assert all(cluster.node(which).running() for which in (1, 2, 3))
    _check_invariants(cluster, result)
    cluster.start_balancer(1)
    for name in ("node1", "node2", "node3"):
        cluster.balancer.wait_status(name, up=True, timeout=30)


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_over_a_redis_cluster_a_node_killed_mid_drop_costs_no_event_and_no_hold(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The same nodes over a Redis Cluster (3 primaries, 3 replicas on the bridge,
    REDIS_URL=redis+cluster://...): a node lost mid-drop costs nothing either."""
    from loadtest.cluster import Cluster, ClusterConfig

    with Cluster(ClusterConfig(name=f"t{uuid.uuid4().hex[:6]}", nodes=3, workers=1,
                               redis_cluster=True,
                               run_dir=str(tmp_path_factory.mktemp("rcluster")))) as c:
        assert c.redis_url.startswith("redis+cluster://")

        def kill_node3() -> float:
            return c.kill_node(3)

        result = _rehearse_with(c, Fault(after_s=0.3, action=kill_node3, budget_s=10.0),
                                tmp_path)
        fault = _assert_everyone_back(result)
        assert fault["announced"] == 0 and 40 <= fault["outages"] <= 200
        _check_invariants(c, result)


# -- the command, and nothing left behind --------------------------------------------------

def _leftovers(netns: list[str], bridge: str, pids: list[int]) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [f"netns {ns}" for ns in netns if ns in out.split()]
    if subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0:
        left.append(f"link {bridge}")
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"pid {pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _wait_clean(netns: list[str], bridge: str, pids: list[int], within: float) -> None:
    deadline = time.monotonic() + within
    while (left := _leftovers(netns, bridge, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"left behind after {within} s: {left}"


def _cli(*args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", "cluster", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _up(tmp_path: Path) -> tuple[list[str], dict[str, Any], list[int], list[str], str]:
    """``cluster up`` with one node: its options, state, every process, namespaces and
    bridge."""
    name = f"t{uuid.uuid4().hex[:6]}"
    named = ["--name", name, "--run-dir", str(tmp_path)]
    up = _cli("up", *named, "--nodes", "1", "--balancer-processes", "1", "--lifetime", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "python -m loadtest rehearse --target http://127.0.0.1:" in up.stdout
    state = json.loads((tmp_path / "state.json").read_text())
    supervisor = psutil.Process(state["pid"])
    pids = [supervisor.pid, *(p.pid for p in supervisor.children(recursive=True))]
    pids += [pid for node in state["nodes"] for pid in node["pids"]]
    netns = [node["netns"] for node in state["nodes"]]
    return named, state, pids, netns, netns[0].removesuffix("n1") + "br"


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cluster_up_status_down_through_the_command(tmp_path: Path) -> None:
    named, _state, pids, netns, bridge = _up(tmp_path)
    status = _cli("status", *named, "--json")
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert [n["readyz"] for n in seen["nodes"]] == ["ready"]
    assert [n["balancer"] for n in seen["nodes"]] == [["UP"]]
    import httpx

    ready = httpx.get(seen["balancer"] + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    again = _cli("up", *named, "--nodes", "1")
    assert again.returncode == 1 and "already up" in again.stderr
    down = _cli("down", *named)
    assert down.returncode == 0 and "down" in down.stdout
    _wait_clean(netns, bridge, pids, within=20)
    assert json.loads((tmp_path / "state.json").read_text())["status"] == "stopped"
    gone = _cli("status", *named)
    assert gone.returncode != 0 and "not up" in gone.stderr


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_harness_leaves_no_namespace_device_or_process(tmp_path: Path) -> None:
    _named, state, pids, netns, bridge = _up(tmp_path)
    assert len(pids) >= 6  # supervisor, reaper(s), HAProxy, Redis, PostgreSQL, node
    os.kill(state["pid"], signal.SIGKILL)
    _wait_clean(netns, bridge, pids, within=30)
