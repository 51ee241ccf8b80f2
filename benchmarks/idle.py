"""Benchmark: what a node costs while nothing happens (issue 16's idle share).

    python -m benchmarks.idle --workers 2 --settle 10 --window 30

A local Redis and PostgreSQL and ``dropserver serve --workers N`` on them
(:func:`benchmarks._support.serve_locally`), one live drop, no viewers. After
``--settle`` seconds it measures, over ``--window`` seconds:

* CPU ms per second of each worker (by its ``DROPSERVER_WORKER_INDEX``), of the
  supervisor, of Redis and of PostgreSQL (every process of it alive at both ends);
* Redis commands per second (``INFO stats`` ``total_commands_processed``, less the two
  ``INFO`` calls of the measure) and PostgreSQL transactions per second
  (``pg_stat_database`` ``xact_commit + xact_rollback`` of the server's database, less
  the two reads of the measure).

Prints one JSON line per run (``--runs``). What the gateway does while idle is the
background loops of its workers (docs/operations.md, "Background work") and the
heartbeat (none here: no viewer); at 20,000 viewers this idle share was half of the
gap to the bare ``websockets`` floor (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time

from benchmarks._support import cpu_seconds, create_live_drop, serve_locally, tree_cpu_seconds

INDEX_ENV = "DROPSERVER_WORKER_INDEX"  # realtime.board.INDEX_ENV (not imported: A/B)


def _worker_index(pid: int) -> str:
    """The worker's ``DROPSERVER_WORKER_INDEX`` from its environment (our own child)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                name, _, value = item.partition(b"=")
                if name.decode(errors="replace") == INDEX_ENV:
                    return value.decode()
    except OSError:
        pass
    return "?"


async def _xacts(database_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"))
    finally:
        await conn.close()


def _redis_commands(redis_url: str) -> int:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def measure(server, services, *, window: float) -> dict:
    """CPU and round trips of the node, Redis and PostgreSQL over ``window`` s."""
    from loadtest.procstat import server_processes

    workers = {p.pid: _worker_index(p.pid) for p in server_processes(server.proc.pid)}
    redis_pid = services.pids.get("redis")
    pg_pid = services.pids.get("postgres")
    # Each read of the counters is itself a command / a transaction: read both
    # ends the same way, then take the reads' own share off (pg_stat's counters are
    # the backend's at its last report: the reading connection's own transaction is
    # counted when that connection closes, so a read sees the one before it).
    x0 = asyncio.run(_xacts(server.database_url))
    c0 = _redis_commands(server.redis_url)
    w0 = {pid: cpu_seconds(pid) for pid in workers}
    s0 = cpu_seconds(server.proc.pid)
    r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    p0 = tree_cpu_seconds(pg_pid) if pg_pid else {}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    w1 = {pid: cpu_seconds(pid) for pid in workers}
    s1 = cpu_seconds(server.proc.pid)
    r1 = cpu_seconds(redis_pid) if redis_pid else 0.0
    p1 = tree_cpu_seconds(pg_pid) if pg_pid else {}
    c1 = _redis_commands(server.redis_url)
    # pg_stat_database lags by up to PGSTAT_MIN_INTERVAL (1 s, PostgreSQL 15): wait it
    # out so the window's last second is in the count.
    time.sleep(1.1)
    x1 = asyncio.run(_xacts(server.database_url))

    def rate(v: float) -> float:
        return round(v * 1000 / elapsed, 2)

    per_worker = sorted(((workers[pid], rate(w1[pid] - w0[pid])) for pid in workers),
                        key=lambda kv: kv[0])
    pg_ms = sum(t - p0.get(pid, 0.0) for pid, t in p1.items())
    return {
        "window_s": round(elapsed, 2),
        "worker_cpu_ms_per_s": dict(per_worker),
        "workers_cpu_ms_per_s": rate(sum(w1[p] - w0[p] for p in workers)),
        "supervisor_cpu_ms_per_s": rate(s1 - s0),
        "redis_cpu_ms_per_s": rate(r1 - r0) if redis_pid else None,
        "postgres_cpu_ms_per_s": rate(pg_ms) if pg_pid else None,
        "redis_commands_per_s": round((c1 - c0 - 1) / elapsed, 2),
        "postgres_xacts_per_s": round((x1 - x0 - 1) / (elapsed + 1.1), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds after /readyz before the window opens")
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=1,
                        help="windows measured one after another on the same node")
    ns = parser.parse_args()
    with contextlib.ExitStack() as stack:
        services, server = serve_locally(stack, workers=ns.workers)
        drop_id = asyncio.run(create_live_drop(services.database_url))
        time.sleep(ns.settle)
        for run in range(ns.runs):
            result = measure(server, services, window=ns.window)
            print(json.dumps({"run": run + 1, "workers": ns.workers, "drop_id": drop_id,
                              "loadavg": [round(x, 2) for x in os.getloadavg()],
                              **result}), flush=True)


if __name__ == "__main__":
    main()
