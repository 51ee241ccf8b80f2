"""Faults in a loop: every fault of tests/test_faults.py, repeated, and what it cost.

Each round runs, on one rig (``dropserver dev --workers 2`` against a Redis and a
PostgreSQL of its own, Stripe played by the loopback stub; tests/fault_rig.py), a rush
of 60 buyers for 40 units with each fault in the middle of it:

* ``postgres_5s`` / ``postgres_60s``: PostgreSQL stopped (fast shutdown), started again;
* ``redis_restart``: Redis stopped and started empty (no persistence);
* ``worker_kill``: one server worker SIGKILLed (the supervisor starts another);
* ``order_worker_kill``: an order worker process SIGKILLs itself between the charge
  and the commit;
* ``supervisor_kill``: ``dropserver dev`` itself SIGKILLed (its tree must die by
  itself), then started again on the same port as systemd would.

After each it checks the invariants (tests/invariants.py) and what buyers learnt, and
counts what the goals name: **acknowledged holds lost**, **unrecorded refunds**
(money the gateway refunded or kept that PostgreSQL does not say), **double
confirms** (a fifth of the buyers confirm twice at once, with two cards: never both
succeed), **double charges** and **orphan processes** (any process of the server's
tree, or the killed order worker, still running afterwards); and the timings: the first order row
after PostgreSQL returns, sales after Redis restarts, the pipeline quiet again.

Run from the repository root: ``python -m benchmarks.faults --repeat 20`` (``--faults``
picks some, ``--json`` writes every report; a loop run in parts, ``--first-round N``
each, is added up by ``--summarize a.json b.json ...``). The exit status is 1 when any invariant
broke. Not a timed test: the figures go to docs/benchmarks.md and the fault table of
docs/topics/checkout.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/ is not installed; the rig lives there
    sys.path.insert(0, str(ROOT))

from tests.fault_rig import FaultReport, Rig, run_fault  # noqa: E402

FAULTS: dict[str, dict[str, Any]] = {
    "postgres_5s": {"fault": "postgres_down", "outage": 5.0},
    "postgres_60s": {"fault": "postgres_down", "outage": 60.0},
    "redis_restart": {"fault": "redis_restart"},
    "worker_kill": {"fault": "worker_kill"},
    "order_worker_kill": {"fault": "order_worker_kill"},
    "supervisor_kill": {"fault": "supervisor_kill"},
}


def classify(report: FaultReport) -> dict[str, int]:
    """The goals' counters for one run, from its broken invariants."""
    v = report.violations
    return {
        "lost_holds": sum("acknowledged hold" in x for x in v),
        "unrecorded_refunds": sum(("refunded" in x and "PostgreSQL records" in x)
                                  or "unrecorded money" in x
                                  or ("but PostgreSQL keeps" in x) for x in v),
        "double_charges": sum("PaymentIntents at the gateway" in x
                              or ("the gateway keeps" in x and "expected" in x
                                  and "[]" not in x) for x in v),
        "double_confirms": report.double_confirms,
        "confirmed_twice": report.confirmed_twice,
        "other_violations": len(v),
        "unheard": len(report.unheard),
        "heard_twice": len(report.duplicates),
        "dead_letters": report.dead_letters,
        "orphans": len(report.orphans),
    }


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    finite = [x for x in values if x != float("inf")]
    if not finite:
        return "never"
    return (f"median {statistics.median(finite):.2f} s, max {max(finite):.2f} s"
            + (f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else ""))


def table(reports: list[dict[str, Any]]) -> str:
    """The goals' counters and the timings, per fault, of saved run reports."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    timings: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    names: list[str] = []
    for saved in reports:
        name = saved["name"]
        if name not in names:
            names.append(name)
        report = FaultReport(**{k: v for k, v in saved.items() if k not in ("round", "name")})
        totals[name]["runs"] += 1
        totals[name]["holds"] += report.holds
        for key, n in classify(report).items():
            totals[name][key] += n
        for key, value in report.timings.items():
            if isinstance(value, int | float):
                timings[name][key].append(float(value))
    header = ("fault", "runs", "holds", "lost holds", "unrecorded refunds",
              "double charges", "double confirms (of tries)", "violations", "unheard",
              "heard twice", "dead letters", "orphans")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        t = totals[name]
        lines.append(f"| {name} | {t['runs']} | {t['holds']} | {t['lost_holds']} | "
                     f"{t['unrecorded_refunds']} | {t['double_charges']} | "
                     f"{t['double_confirms']} ({t['confirmed_twice']}) | "
                     f"{t['other_violations']} | {t['unheard']} | {t['heard_twice']} | "
                     f"{t['dead_letters']} | {t['orphans']} |")
    lines.append("")
    for name in names:
        for key, values in timings[name].items():
            lines.append(f"{name} {key}: {_stats(values)}")
    return "\n".join(lines)


def _ok(report: FaultReport) -> bool:
    return report.ok and report.dead_letters == 0


def summarize(files: list[str]) -> int:
    """Print the table of reports saved by ``--json`` (a loop run in parts)."""
    saved = [r for f in files for r in json.loads(Path(f).read_text())]
    print(f"{len(saved)} run(s) from {len(files)} file(s)")
    print(table(saved))
    return 0 if all(_ok(FaultReport(**{k: v for k, v in r.items()
                                      if k not in ("round", "name")}))
                    for r in saved) else 1


async def main(args: argparse.Namespace) -> int:
    names = args.faults.split(",") if args.faults else list(FAULTS)
    for name in names:
        if name not in FAULTS:
            raise SystemExit(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    reports: list[dict[str, Any]] = []
    started = time.monotonic()
    broken = 0
    last = args.first_round + args.repeat
    with Rig(workers=2, hold_ttl=120) as rig:
        for i in range(args.first_round, last):
            for name in names:
                spec = FAULTS[name]
                t0 = time.monotonic()
                try:
                    report = await run_fault(rig, spec["fault"], seed=i,
                                             outage=spec.get("outage", 5.0))
                except Exception as exc:  # a run that could not finish counts as broken
                    report = FaultReport(fault=name, violations=[f"run failed: {exc!r}"])
                ok = _ok(report)
                broken += not ok
                print(f"[{i + 1}/{last}] {name}: {'ok' if ok else 'BROKEN'} "
                      f"holds={report.holds} {dict(report.timings)} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
                if not ok:
                    print(report.summary(), flush=True)
                reports.append({"round": i, "name": name, **{
                    k: v for k, v in report.__dict__.items() if k != "rush"}})
                if args.json:  # after every run: a loop stopped early keeps what it did
                    await asyncio.to_thread(Path(args.json).write_text,
                                            json.dumps(reports, indent=1, default=str))
    print(f"\n{args.repeat} round(s) of {len(names)} fault(s) in "
          f"{(time.monotonic() - started) / 60:.1f} min")
    print(table(reports))
    return 1 if broken else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1, help="rounds of every fault (1)")
    p.add_argument("--faults", default="",
                   help=f"comma-separated, of: {', '.join(FAULTS)} (all)")
    p.add_argument("--first-round", type=int, default=0,
                   help="number of the first round (its seed), to run a loop in parts (0)")
    p.add_argument("--json", default="",
                   help="write every run's report to this file (after each run)")
    p.add_argument("--summarize", nargs="+", default=[], metavar="JSON",
                   help="print the table of reports saved by --json (loops run in parts)")
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(summarize(_args.summarize) if _args.summarize else asyncio.run(main(_args)))
