"""Benchmark: giveaway entries per second through the real socket path vs raw EVALSHA.

Two figures from the same run, same machine, same script:

* **end to end**: ``dropserver serve --workers N`` (real Redis, real PostgreSQL);
  ``--sockets`` viewers (each its own user) connect over WebSockets and join a live
  drop; the creator opens a giveaway; every viewer sends ``giveaway.enter`` back to
  back ``--entries-per-socket`` times (the first one enters, the others are repeats,
  which run the same script and answer ``new: false``), at most 45 frames a second per
  socket (the gateway allows 50). Entries/s = answers / time from the first entry
  sent to the last answer. Every answer is checked: no refusal, exactly ``--sockets``
  new entrants, and the server's count equal to them; then the draw is awaited and
  recomputed from PostgreSQL (:func:`drops.giveaway_store.audit`).
* **raw EVALSHA**: ``redis-benchmark`` calling ``giveaway_enter.lua`` by SHA with the
  same key and argument shape, random users, against a giveaway opened straight in
  Redis: the ceiling of the script itself.

Run: ``python -m benchmarks.giveaway`` (``--help`` for sizes); 50,000 entries by
default (5,000 sockets x 10). Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import msgpack

from benchmarks._buyers import Buyer, open_buyers, selling_drop, source_addresses
from benchmarks._support import (
    CpuWatch,
    Profile,
    Server,
    client_loop,
    redis_benchmark_evalsha,
    serve_locally,
    top_frames,
)

__all__ = ["main"]

MIN_GAP_S = 1 / 45  # per socket: under the gateway's 50 frames a second


class _Entries:
    """One viewer's entries, one after another, each sent from the callback that read
    the previous answer (the shape of :func:`benchmarks._buyers.rush`: no task or
    future per entry, so the client takes as little of the shared machine as it can);
    at most one every :data:`MIN_GAP_S`."""

    __slots__ = ("answers", "buyer", "done", "gid", "last", "left", "rid")

    def __init__(self, buyer: Buyer, gid: int, n: int, answers: list[tuple[float, str]],
                 done: Any) -> None:
        self.buyer, self.gid, self.left, self.answers, self.done = buyer, gid, n, answers, done
        self.rid: str | None = None
        self.last = 0.0
        buyer.rush = self

    def next(self) -> None:
        wait = self.last + MIN_GAP_S - time.monotonic()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self.next)
            return
        self.last = time.monotonic()
        b = self.buyer
        rid = self.rid = str(next(b._ids))
        b.conn.send(msgpack.packb({"t": "giveaway.enter", "id": rid,
                                   "giveaway_id": self.gid}))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        what = (("new" if frame["data"]["new"] else "repeat") if frame["t"] == "reply"
                else str(frame.get("code")))
        self.answers.append((time.monotonic(), what))
        self.left -= 1
        if self.left > 0:
            self.next()
        else:
            self._finish(b)

    def lost(self, b: Buyer, why: str) -> None:
        self.answers.append((time.monotonic(), why))
        self._finish(b)

    def _finish(self, b: Buyer) -> None:
        b.rush = None
        self.done[0] -= 1
        if self.done[0] == 0 and not self.done[1].done():
            self.done[1].set_result(None)


async def end_to_end(server: Server, *, sockets: int, per_socket: int, sources: int,
                     window_s: int, redis_pid: int | None = None,
                     postgres_pid: int | None = None, profile: str | None = None,
                     ) -> dict[str, Any]:
    import asyncpg
    import httpx

    from drops import giveaway_store
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    creator = issue_token(settings, "bench-creator", Role.CREATOR)
    drop_id, _ = await selling_drop(server.base_url, creator, units=10)
    tokens = [issue_token(settings, f"bench-{i}", Role.VIEWER) for i in range(sockets)]
    buyers = await open_buyers(server.ws_url, drop_id, tokens,
                               sources=source_addresses(sources))
    # Idle longer than uvicorn's 5 s keep-alive while the entries go in: a pooled
    # connection reused then meets the server closing it (httpx.ReadError, seen).
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30,
                                 limits=httpx.Limits(keepalive_expiry=1.0),
                                 headers={"Authorization": f"Bearer {creator}"}) as http:
        resp = await http.post(f"/v1/drops/{drop_id}/giveaways", json={
            "prize": "bench", "winners": 3, "duration_s": window_s})
        resp.raise_for_status()
        gid = resp.json()["id"]
        answers: list[tuple[float, str]] = []
        done = [len(buyers), asyncio.get_running_loop().create_future()]
        cpu = CpuWatch(server, redis_pid, postgres_pid)
        spy = (Profile(profile, {"server": server.proc.pid, "client": os.getpid()},
                       with_children=("server",)) if profile else None)
        started = time.monotonic()
        try:
            for b in buyers:
                _Entries(b, gid, per_socket, answers, done).next()
            await done[1]
        finally:
            if spy is not None:
                spy.stop()
        spent = cpu.spent()
        last = max(t for t, _ in answers)
        count_after = (await http.get(f"/v1/drops/{drop_id}/giveaways/{gid}")).json()
        for b in buyers:
            b.close()
        # the draw, at the window's end
        deadline = time.monotonic() + window_s + 60
        while time.monotonic() < deadline:
            body = (await http.get(f"/v1/drops/{drop_id}/giveaways/{gid}")).json()
            if body["state"] == "drawn":
                break
            await asyncio.sleep(0.5)
    conn = await asyncpg.connect(server.database_url)
    try:
        audit = await giveaway_store.audit(conn, gid)
    finally:
        await conn.close()
    outcomes: dict[str, int] = {}
    for _, what in answers:
        outcomes[what] = outcomes.get(what, 0) + 1
    seconds = last - started
    return {"entries": len(answers), "seconds": seconds,
            "per_second": len(answers) / seconds if seconds > 0 else 0.0,
            "outcomes": outcomes, "live_count": count_after["entries"],
            "drawn": body["state"] == "drawn", "entrants": body.get("entries"),
            "audit_ok": audit.ok, "audit_problems": audit.problems[:5], **spent}


def raw_evalsha(redis_url: str, *, requests: int, clients: int, pipeline: int) -> float:
    """redis-benchmark EVALSHA of giveaway_enter.lua; returns requests per second."""
    import redis as sync_redis

    from drops.giveaway_store import KEEP_MS, entrants_key, gw_key
    from drops.scripts import load

    d, g = 900_000_003, 1
    client = sync_redis.Redis.from_url(redis_url)
    try:
        now_ms = int(time.time() * 1000)
        client.delete(gw_key(d, g), entrants_key(d, g))
        client.hset(gw_key(d, g), mapping={"state": "open", "opened_at": now_ms,
                                           "closes_at": now_ms + 3_600_000,
                                           "creator": "nobody", "entries": 0})
        client.pexpire(gw_key(d, g), KEEP_MS)
        # A random user per call (__rand_int__): distinct entrants, mostly new.
        return redis_benchmark_evalsha(
            redis_url, load("giveaway_enter").single.script,
            [gw_key(d, g), entrants_key(d, g)], ["u__rand_int__", "Viewer"],
            requests=requests, clients=clients, pipeline=pipeline)
    finally:
        client.delete(gw_key(d, g), entrants_key(d, g))
        client.close()


BENCH_ENV = {"DROPSERVER_ORDER_WORKERS": "0", "DROPSERVER_MAX_CONNECTIONS": "60000"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.giveaway",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--entries-per-socket", type=int, default=10)
    parser.add_argument("--window", type=int, default=30,
                        help="the giveaway's entry window, seconds (longer than the run)")
    parser.add_argument("--sources", type=int, default=4,
                        help="127.0.0.x source addresses to spread sockets over")
    parser.add_argument("--raw-requests", type=int, default=300_000)
    parser.add_argument("--raw-clients", type=int, default=50)
    parser.add_argument("--raw-pipeline", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the server's workers and this client during each "
                             "run's entries (DIR/run-N/{server,client}.txt; not a figure "
                             "of record)")
    ns = parser.parse_args(argv)

    from benchmarks._support import raise_nofile
    raise_nofile()
    client_loop()  # the client's loop, as the server's
    with contextlib.ExitStack() as stack:
        services, server = serve_locally(stack, workers=ns.workers, env=BENCH_ENV)
        ok = True
        for run in range(ns.runs):
            profile = os.path.join(ns.profile, f"run-{run + 1}") if ns.profile else None
            e2e = asyncio.run(end_to_end(server, sockets=ns.sockets,
                                         per_socket=ns.entries_per_socket,
                                         sources=ns.sources, window_s=ns.window,
                                         redis_pid=services.pids.get("redis"),
                                         postgres_pid=services.pids.get("postgres"),
                                         profile=profile))
            # Every answer new or a repeat (no refusal, none lost), one new per viewer,
            # the live count and the draw's entrants equal to them, the draw audited.
            want = {"new": ns.sockets,
                    "repeat": ns.sockets * (ns.entries_per_socket - 1)}
            ok = ok and ({k: v for k, v in e2e["outcomes"].items() if v} == {
                k: v for k, v in want.items() if v} and e2e["live_count"] == ns.sockets
                and e2e["entrants"] == ns.sockets and e2e["drawn"] and e2e["audit_ok"])
            raw = raw_evalsha(services.redis_url, requests=ns.raw_requests,
                              clients=ns.raw_clients, pipeline=ns.raw_pipeline)
            print(json.dumps({
                "run": run + 1, "end_to_end_per_s": round(e2e["per_second"]),
                "entries": e2e["entries"], "seconds": round(e2e["seconds"], 3),
                "outcomes": e2e["outcomes"], "live_count": e2e["live_count"],
                "drawn": e2e["drawn"], "entrants": e2e["entrants"],
                "audit_ok": e2e["audit_ok"], "audit_problems": e2e["audit_problems"],
                "server_cpu_s": e2e["server_cpu_s"], "server_sys_s": e2e["server_sys_s"],
                "client_cpu_s": e2e["client_cpu_s"],
                "redis_cpu_s": e2e["redis_cpu_s"], "postgres_cpu_s": e2e["postgres_cpu_s"],
                "raw_evalsha_per_s": round(raw),
                "raw_over_end_to_end": round(raw / max(e2e["per_second"], 1e-9), 2),
            }), flush=True)
            if profile:
                for name in ("server", "client"):
                    print(json.dumps({"profile": name, **top_frames(
                        os.path.join(profile, f"{name}.txt"))}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
