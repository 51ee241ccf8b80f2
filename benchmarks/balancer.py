"""Benchmark: a drop through HAProxy across several nodes, and a node lost mid-drop.

    python -m benchmarks.balancer --viewers 10000 --stock 500

Runs, one after the other, the same rehearsal (``loadtest.rehearse``: N viewers, one
drop, a rush for ``--stock`` units) four times:

1. **baseline**: one local node, ``dropserver serve --workers <nodes>`` on loopback
   (as many worker processes as the cluster has in all), no balancer;
2. **cluster**: the cluster harness (``loadtest.cluster``: ``--nodes`` nodes, one
   worker each, each in its own network namespace, behind HAProxy with the
   configuration of docs/operations.md), viewers, buyers and the creator through the
   balancer;
3. **kill**: the same, and ``--fault-after`` seconds after the creator's BUY NOW was
   answered every process of node 2 is SIGKILLed (no ``going_away``);
4. **drain**: node 2 started again, then SIGTERMed at the same moment (a drain).

For each it records BUY NOW's fan-out latency, the reservations, events lost, the
oversell audit, the nodes' memory and CPU and HAProxy's; for the faults, when every viewer of
the lost node was back and caught up (its ``joined`` answer: the missed events, or
a snapshot), how many came back through history or a snapshot, and the drop's
invariants afterwards (tests/invariants.py: no acknowledged hold lost, PostgreSQL
and Redis agree). Root is needed (network namespaces). Prints one JSON object and
writes every rehearsal's report under ``--out``; the figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/ is not installed; the invariants live there
    sys.path.insert(0, str(ROOT))

from loadtest.cluster import Cluster, ClusterConfig  # noqa: E402
from loadtest.fault import Fault  # noqa: E402
from loadtest.rehearse import RehearsalConfig, rehearse  # noqa: E402
from loadtest.target import ClusterTarget  # noqa: E402


async def drop_violations(database_url: str, redis_url: str,
                          result: dict[str, Any]) -> list[str]:
    """The invariants of a rehearsal's drop once its order stream is quiet, with every
    hold the rehearsal's buyers were told of (``result["holds"]``) acknowledged."""
    import asyncpg

    from dropserver.redis_client import connect, ready
    from tests import invariants

    db = await asyncpg.connect(database_url)
    redis = connect(redis_url)  # one Redis, or a Redis Cluster (redis+cluster://)
    await ready(redis)
    try:
        drop_id = result["drop"]["id"]
        # A killed node's unconfirmed order entries are claimed by the other nodes.
        await invariants.quiesce(redis, drop_id, within=90)
        told = {hold: {"user_id": user, "buyer_number": number}
                for user, hold, number in result["holds"]}
        found = await invariants.violations(
            db, redis, drop_id, acknowledged=told,
            payments=await invariants.fake_gateway_payments(redis))
        if len(told) != result["reservations"]["held"]:
            found.append(f"{result['reservations']['held']} holds answered, "
                         f"{len(told)} hold ids reported")
        return found
    finally:
        await db.close()
        await redis.aclose()


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    bn = result["buy_now"]["latency"]
    res = result["reservations"]
    out: dict[str, Any] = {
        "passed": result["passed"], "failures": result["failures"],
        "joined": result["connections"]["joined"],
        "connect_rate_per_s": result["connections"]["rate_per_s"],
        "buy_now_ms": {k: bn.get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "buy_now_seen": result["buy_now"]["seen"],
        "buy_now_late": result["buy_now"]["late_via_snapshot"],
        "reservations": {k: res[k] for k in ("sent", "held", "sold_out", "rejected",
                                              "no_reply")},
        "reservation_ms": {k: res["latency"].get(k) for k in ("p50_ms", "p99_ms")},
        "events_lost": result["positions"]["lost"],
        "out_of_order": result["positions"]["out_of_order"],
        "oversold": result["audit"].get("oversold"),
        "server": {k: result["server"].get(k) for k in (
            "workers", "rss_per_connection_kib", "cpu_avg_percent", "cpu_peak_percent",
            "cpu_rush_percent")},
        "floor_p99_ms": (result.get("floor") or {}).get("latency", {}).get("p99_ms"),
    }
    if result.get("fault"):
        f = result["fault"]
        out["fault"] = {k: f[k] for k in ("what", "outages", "still_down", "recovered",
                                          "snapshot", "announced", "last_back_s",
                                          "buy_retries")}
        out["fault"]["back_after_fault_ms"] = {
            k: f["back_after_fault"].get(k) for k in ("p50_ms", "p99_ms", "max_ms")}
    return out


def _balancer_usage(target: Any) -> tuple[float, int] | None:
    """CPU seconds and RSS of the cluster's HAProxy processes (None: no cluster)."""
    import psutil

    cluster = getattr(target, "cluster", None)
    if cluster is None or cluster.balancer is None:
        return None
    cpu, rss = 0.0, 0
    for proc in cluster.balancer.procs:
        try:
            p = psutil.Process(proc.pid)
            times = p.cpu_times()
            cpu += times.user + times.system
            rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return cpu, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viewers", type=int, default=10000)
    parser.add_argument("--stock", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--fault-after", type=float, default=0.3, dest="fault_after_s",
                        help="seconds after the creator's BUY NOW was answered: the node "
                        "is killed or drained")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="every viewer of the lost node back within this, seconds")
    parser.add_argument("--runs", default="baseline,cluster,kill,drain",
                        help="which of baseline, cluster, kill, drain (comma separated)")
    parser.add_argument("--out", default="loadtest-reports/balancer")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A rush spread over a second and a half: a fault 0.3 s in strikes with buys in
    # flight. Each rehearsal is bounded (--max-duration of the kit).
    base = dict(viewers=args.viewers, stock=args.stock, buy_probability=0.5,
                buy_delay_ms=(0, 1500), chat_messages=10, countdown_s=2.0,
                rush_timeout_s=60, max_duration_s=900, out_dir=str(out_dir), quiet=True,
                p99_budget_ms=5000, command="python -m benchmarks.balancer "
                + " ".join(sys.argv[1:]))
    summary: dict[str, Any] = {"viewers": args.viewers, "stock": args.stock,
                               "nodes": args.nodes, "started": time.strftime(
                                   "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def run(name: str, cfg: RehearsalConfig, target: Any = None) -> dict[str, Any]:
        started = time.monotonic()
        before = _balancer_usage(target)
        result = asyncio.run(rehearse(cfg, target=target))
        wall = time.monotonic() - started
        summary[name] = _summary(result)
        summary[name]["wall_s"] = round(wall, 1)
        after = _balancer_usage(target)
        if before is not None and after is not None:  # HAProxy's own cost
            cpu = after[0] - before[0]
            summary[name]["balancer"] = {"cpu_s": round(cpu, 2),
                                         "cpu_percent": round(100 * cpu / wall, 1),
                                         "rss_mib": round(after[1] / 2**20, 1)}
        print(f"{name}: {json.dumps(summary[name])}", file=sys.stderr, flush=True)
        return result

    if "baseline" in runs:
        run("baseline", RehearsalConfig(**base, server_workers=args.nodes))
    if not {"cluster", "kill", "drain"} & set(runs):
        print(json.dumps(summary, indent=2))
        return 0
    cluster = Cluster(ClusterConfig(name=f"bench{int(time.time())}", nodes=args.nodes,
                                    workers=1))
    started = time.monotonic()
    with cluster:
        summary["cluster_up_s"] = round(time.monotonic() - started, 1)
        if "cluster" in runs:
            run("cluster", RehearsalConfig(**base), ClusterTarget(cluster))
        def kill_node2() -> float:
            return cluster.kill_node(2)

        def drain_node2() -> float:
            return cluster.drain_node(2, wait=True)

        for name, action in (("kill", kill_node2), ("drain", drain_node2)):
            if name not in runs:
                continue
            if not cluster.node(2).running():
                cluster.start_node(2)
                cluster.balancer.wait_status("node2", up=True)  # type: ignore[union-attr]
            fault = Fault(after_s=args.fault_after_s, action=action, budget_s=args.budget)
            cfg = RehearsalConfig(**base, fault=fault, floor=False)
            result = run(name, cfg, ClusterTarget(cluster))
            found = asyncio.run(drop_violations(cluster.database_url, cluster.redis_url,
                                                result))
            summary[name]["invariants_broken"] = found
            summary[name]["acknowledged_holds"] = len(result["holds"])
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
