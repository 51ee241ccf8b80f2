"""Primary failovers mid-rush on a Redis Cluster, in a loop: oversold units, lost holds.

Each round runs, on one rig (``dropserver dev --workers 2`` over a local Redis Cluster
of 3 primaries and 3 replicas and a PostgreSQL of its own, Stripe played by the
loopback stub; tests/fault_rig.py with ``redis_cluster=True``), a rush of 60 buyers
for 40 units and, a second into it, SIGKILLs the cluster primary that holds the drop
(``primary_kill``): its replica is promoted, sales resume on it, and the killed node
is started again and rejoins as a replica (the next round's drop may live on any
shard, so the kills move around the cluster). ``--lagging`` first freezes the
replica (SIGSTOP) for 2 s while buyers buy, so replication really lags at the kill.
``--burn N`` runs N busy-looping processes beside it: on the 2-core VM that starves the
server and Redis as a loaded CI runner does (where the lagging case once broke).

After each round it waits until the order pipeline is quiet and checks the
invariants (tests/invariants.py), and counts what the goal names: **oversold**
(units in live orders beyond a product's units, a buyer over the limit, a buyer
number told twice) and **lost acknowledged holds** (a hold a buyer was told about
without exactly one order row, or that Redis and PostgreSQL disagree on), with the
timings: the replica promoted, sales resumed.

Run from the repository root: ``python -m benchmarks.failover --repeat 20``
(``--env DROPSERVER_HOLD_REPLICAS=0`` runs it without WAIT before acknowledging a
hold, to see what the repair path alone does). The exit status is 1 when any
invariant broke. Not a timed test: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/ is not installed; the rig lives there
    sys.path.insert(0, str(ROOT))

from tests.fault_rig import FaultReport, Rig, run_fault  # noqa: E402

__all__ = ["classify", "main"]


def classify(report: FaultReport) -> dict[str, int]:
    """The goal's counters for one round, from its broken invariants."""
    v = report.violations
    oversold = [x for x in v if "units in live orders" in x or "the limit is" in x
                or "buyer was told buyer_number" in x]
    lost = [x for x in v if "acknowledged hold" in x or "Redis has no hold" in x]
    return {"oversold": len(oversold), "lost_holds": len(lost),
            "other_violations": len(v) - len(oversold) - len(lost),
            "unheard": len(report.unheard), "heard_twice": len(report.duplicates),
            "dead_letters": report.dead_letters, "orphans": len(report.orphans)}


@contextlib.contextmanager
def _burning(n: int, *, bound_s: float) -> Iterator[None]:
    """``n`` processes spinning on the CPU while the block runs (each stops by itself
    after ``bound_s`` whatever happens here)."""
    spin = f"import time\nend = time.monotonic() + {bound_s}\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="failovers")
    parser.add_argument("--buyers", type=int, default=60)
    parser.add_argument("--units", type=int, default=40)
    parser.add_argument("--lagging", action="store_true",
                        help="freeze the replica 2 s before killing its primary")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the server under test (repeatable)")
    parser.add_argument("--json", type=Path, help="write every round's report here")
    parser.add_argument("--burn", type=int, default=0, metavar="N",
                        help="N busy-looping processes beside the rounds: the server and "
                             "Redis starved of CPU, as on a loaded CI runner")
    ns = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in ns.env)
    fault = "primary_kill_lagging" if ns.lagging else "primary_kill"
    totals: dict[str, int] = {}
    timings: dict[str, list[float]] = {}
    rounds: list[dict[str, Any]] = []
    dead_before = 0
    started = time.monotonic()
    with _burning(ns.burn, bound_s=120 * ns.repeat + 120), \
            Rig(workers=2, hold_ttl=120, redis_cluster=True, env=env) as rig:
        for i in range(ns.repeat):
            report = asyncio.run(run_fault(rig, fault, buyers=ns.buyers, units=ns.units,
                                           outage=2.0, seed=1000 + i))
            counts = classify(report)
            # orders:dead is the rig's, kept across rounds: this round's are the new ones
            counts["dead_letters"], dead_before = (report.dead_letters - dead_before,
                                                   report.dead_letters)
            for k, n in counts.items():
                totals[k] = totals.get(k, 0) + n
            for k, t in report.timings.items():
                timings.setdefault(k, []).append(t)
            line = {"round": i + 1, "holds": report.holds, **counts,
                    "timings": report.timings, "buyers_saw": report.buyers_saw}
            if report.violations:
                line["violations"] = report.violations[:10]
            rounds.append(line)
            print(json.dumps(line), flush=True)
    summary = {
        "command": " ".join(["python -m benchmarks.failover", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "failovers": ns.repeat, "fault": fault, "env": env, "burn": ns.burn, **totals,
        "timings": {k: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)}
                    for k, v in timings.items() if v and all(x != float("inf") for x in v)},
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    print(json.dumps(summary, indent=2))
    if ns.json:
        ns.json.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    return 1 if totals.get("oversold") or totals.get("lost_holds") or totals.get(
        "other_violations") else 0


if __name__ == "__main__":
    sys.exit(main())
