"""Benchmark: one node taking a crashed node's viewers back, all at once.

When a node of a cluster dies, its viewers come back through the balancer to the
survivors within a second (the first retry's jitter window, docs/protocol.md), each
with the position it had (``since``). This measures how fast one worker takes such a
burst: ``dropserver serve --workers 1`` against a fresh local Valkey and PostgreSQL,
one live drop with a few events in its history;

1. ``--resident`` signed-in viewers join and stay (the node's own audience);
2. ``--burst`` other signed-in viewers join, note their position, and leave (they
   were the dead node's);
3. the burst: the same ``--burst`` viewers open new sockets over ``--window`` seconds
   (uniform, as the clients' jitter spreads them) and join with ``since``; each is
   "back" at its ``joined`` (recovered from history, or a snapshot).

Printed: when the burst's viewers were back (from the burst's start: p50 / p99 /
max), the join rate, the worker's CPU, and with ``--profile DIR`` the worker's
py-spy profile of the burst (the frames with the most samples). Run:
``python -m benchmarks.join_burst`` (``--help`` for sizes); figures go to
docs/benchmarks.md ("Balancer").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from typing import Any

import msgpack

from benchmarks._buyers import Buyer, open_buyers, source_addresses
from benchmarks._support import (
    Profile,
    cpu_seconds,
    create_live_drop,
    pcts,
    start_server,
    top_frames,
)

__all__ = ["main"]


class _Rejoiner(Buyer):
    """A buyer that joins from a position (a reconnect), and notes when it is back."""

    def __init__(self, drop_id: int, token: str, since: dict[str, Any] | None) -> None:
        super().__init__(drop_id, token)
        self.since = since
        self.back_at: float | None = None

    def on_open(self, conn: Any) -> None:
        self.conn = conn
        join: dict[str, Any] = {"t": "join", "id": "join", "drop_id": self.drop_id,
                                "token": self.token}
        if self.since is not None:
            join["since"] = self.since
        conn.send(msgpack.packb(join))

    def _frame(self, frame: dict[str, Any]) -> None:
        if frame.get("t") == "joined" and self.back_at is None:
            self.back_at = time.monotonic()
        super()._frame(frame)


async def _burst(server: Any, resident: int, burst: int, window: float,
                 profile_dir: str | None, worker: int) -> dict[str, Any]:
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings
    from loadtest.wsclient import connect

    drop_id = await create_live_drop(server.database_url)
    settings = load_settings({}, dev=True)
    sources = source_addresses(4)
    residents = await open_buyers(
        server.ws_url, drop_id,
        [issue_token(settings, f"stay-{i}", Role.VIEWER) for i in range(resident)],
        sources=sources)
    tokens = [issue_token(settings, f"back-{i}", Role.VIEWER) for i in range(burst)]
    leavers = await open_buyers(server.ws_url, drop_id, tokens, sources=sources)
    positions = []
    for b in leavers:
        pos = b.joined.result()["pos"]
        positions.append({"epoch": pos["epoch"], "offset": pos["offset"]})
        b.close()
    await asyncio.gather(*(b.closed for b in leavers), return_exceptions=True)
    await asyncio.sleep(2.0)

    rng = random.Random(7)
    back = [_Rejoiner(drop_id, t, p) for t, p in zip(tokens, positions, strict=True)]
    profile = (Profile(profile_dir, {"worker": worker}, rate=250)
               if profile_dir else None)
    cpu0 = cpu_seconds(worker)
    start = time.monotonic()

    async def one(i: int, b: _Rejoiner) -> None:
        await asyncio.sleep(rng.uniform(0.0, window))
        await connect(server.ws_url, b, source=sources[i % len(sources)], connect_timeout=30)
        await asyncio.wait_for(b.joined, 60)

    results = await asyncio.gather(*(one(i, b) for i, b in enumerate(back)),
                                   return_exceptions=True)
    took = time.monotonic() - start
    cpu = cpu_seconds(worker) - cpu0
    files = profile.stop() if profile else {}
    failed = [r for r in results if isinstance(r, BaseException)]
    times = [b.back_at - start for b in back if b.back_at is not None]
    recovered = sum(1 for b in back if b.joined.done() and not b.joined.exception()
                    and b.joined.result().get("recovered"))
    out: dict[str, Any] = {
        "resident": resident, "burst": burst, "window_s": window,
        "back": len(times), "failed": len(failed),
        "failures": sorted({f"{type(e).__name__}: {e}"[:120] for e in failed})[:5],
        "recovered": recovered,
        "back_s": pcts(times) if times else {},
        "last_back_s": round(max(times), 3) if times else None,
        "joins_per_s": round(len(times) / took, 1),
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_ms_per_join": round(1000 * cpu / max(1, len(times)), 2),
    }
    if files:
        out["profile"] = {k: top_frames(v, 30) for k, v in files.items()}
    for b in residents + back:
        b.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.churn import _worker_pid
    from dropserver.db import migrate_database
    from dropserver.services import LocalServices

    parser = argparse.ArgumentParser(prog="python -m benchmarks.join_burst",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--resident", type=int, default=3333,
                        help="viewers already on the node")
    parser.add_argument("--burst", type=int, default=1667,
                        help="viewers coming back at once")
    parser.add_argument("--window", type=float, default=0.5,
                        help="seconds the burst's first attempts are spread over")
    parser.add_argument("--profile", default="", help="py-spy the worker; files here")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the server")
    ns = parser.parse_args(argv)
    env = dict(e.split("=", 1) for e in ns.env)
    with LocalServices() as services:
        asyncio.run(migrate_database(services.database_url))
        server = start_server(services.redis_url, services.database_url, workers=1, env=env)
        try:
            result = asyncio.run(_burst(server, ns.resident, ns.burst, ns.window,
                                        ns.profile or None, _worker_pid(server.proc.pid)))
        finally:
            server.stop()
    result = {
        "command": "python -m benchmarks.join_burst " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}",
        **result,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
