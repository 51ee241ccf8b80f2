"""Benchmark: does a worker give the memory of closed connections back?

``dropserver serve --workers 1`` against a fresh local Valkey and PostgreSQL; each
round ``--viewers`` signed-in viewers connect and join one live drop, then all close.
Printed per round: the worker's RSS with everyone connected and 3 s after they left.
A worker that reclaims closed sockets stays flat from the second round on; one that
does not grows by the same amount every round (``--gc-threshold 100000,50,1000``
did: its full collections almost never run, and the cycles a closed connection
leaves wait for one).

Run: ``python -m benchmarks.churn`` (``--help`` for sizes). Figures go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

from benchmarks._buyers import open_buyers, source_addresses
from benchmarks._support import Server, create_live_drop, rss_kib, start_server

__all__ = ["main"]


def _worker_pid(supervisor: int) -> int:
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        children = f.read().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one worker under {supervisor}, found {children}")
    return int(children[0])


async def _rounds(server: Server, viewers: int, rounds: int) -> list[dict[str, int]]:
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    drop_id = await create_live_drop(server.database_url)
    settings = load_settings({}, dev=True)
    worker = _worker_pid(server.proc.pid)
    out = [{"round": -1, "connected_kib": rss_kib(worker), "after_close_kib": rss_kib(worker)}]
    for r in range(rounds):
        tokens = [issue_token(settings, f"churn-{r}-{i}", Role.VIEWER) for i in range(viewers)]
        buyers = await open_buyers(server.ws_url, drop_id, tokens,
                                   sources=source_addresses(2))
        await asyncio.sleep(1.0)
        connected = rss_kib(worker)
        for b in buyers:
            b.close()
        await asyncio.gather(*(b.closed for b in buyers), return_exceptions=True)
        await asyncio.sleep(3.0)
        row = {"round": r, "connected_kib": connected, "after_close_kib": rss_kib(worker)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    from dropserver.db import migrate_database
    from dropserver.services import LocalServices

    parser = argparse.ArgumentParser(prog="python -m benchmarks.churn",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=5000, help="viewers per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gc-threshold", default="",
                        help="DROPSERVER_GC_THRESHOLD for the worker (default: the setting's)")
    ns = parser.parse_args(argv)
    env = {"DROPSERVER_GC_THRESHOLD": ns.gc_threshold} if ns.gc_threshold else {}
    with LocalServices() as services:
        asyncio.run(migrate_database(services.database_url))
        server = start_server(services.redis_url, services.database_url, workers=1, env=env)
        try:
            rows = asyncio.run(_rounds(server, ns.viewers, ns.rounds))
        finally:
            server.stop()
    steady = rows[2:]  # from the second round on: caches and pools are warm
    growth = steady[-1]["after_close_kib"] - steady[0]["after_close_kib"]
    result = {
        "command": "python -m benchmarks.churn " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}",
        "gc_threshold": ns.gc_threshold or "default",
        "viewers_per_round": ns.viewers, "rounds": rows,
        "growth_kib_from_round_1": growth,
        "growth_kib_per_churned_viewer": round(growth / max(1, ns.viewers * (len(steady) - 1)), 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
