"""Benchmark: the server's CPU per buy command in a rush, refused (sold out) and held.

At BUY NOW most buys of a rush are refused: 25,000 buys for 500 units at 50,000
viewers, ~24,500 of them ``sold_out``, all on the cores the viewers share. This
measures what each costs the server: ``dropserver serve --workers N`` (real Redis,
real PostgreSQL), ``--sockets`` buyers joined over WebSockets, each sending
``--buys`` ``buy`` commands back to back (a new idempotency key each, the next from
the callback that read the answer), in two phases, each on a drop of its own:

* **refusals**: a product with one unit (per-buyer limit 1), bought first by a buyer
  of its own (one hold), so every buy of the phase is answered ``sold_out``;
* **holds**: a product with a unit for every buy (per-buyer limit = ``--buys``), so
  every buy is a new hold.

Figure: server CPU per answer = CPU seconds of the workers (user + system, from
``/proc``) from the first buy sent to the last answered / answers, in microseconds
(``refusal_us``, ``hold_us``), with the answers per second and the CPU of Redis,
PostgreSQL and this load generator. Every answer is counted: the run exits 1 when a
phase's answers are not all of its kind (a hold in the refusals phase, a refusal in
the holds phase, an unanswered buy). The limits are the buy path benchmark's
(:data:`benchmarks.reserve.BENCH_LIMITS`): per user 100 attempts per 10 s, velocity
20 in 2 s, so no attempt is refused for its rate. ``--profile DIR`` samples the
workers with py-spy during each phase (not a figure of record).

Its baseline is the code before a change, run alternately in its own hold of the bench
lock (docs/benchmarks.md, "Buy path"). Run: ``python -m benchmarks.buy_cpu``.
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
    bench_env,
    client_loop,
    serve_locally,
    top_frames,
)
from benchmarks.reserve import BENCH_LIMITS

__all__ = ["main", "storm"]


class _Storm:
    """Every buyer sends ``buys`` buys one after another; answers counted by code."""

    def __init__(self, buyers: list[Buyer], product_id: int, buys: int, tag: str) -> None:
        self.product_id, self.buys, self.tag = product_id, buys, tag
        self.codes: dict[str, int] = {}
        self.left = len(buyers)
        self.sent = {id(b): 0 for b in buyers}
        self.index = {id(b): i for i, b in enumerate(buyers)}
        self.rids: dict[int, str] = {}
        self.last = time.perf_counter()
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        if not buyers:
            self.done.set_result(None)

    def send(self, b: Buyer) -> None:
        n = self.sent[id(b)]
        self.sent[id(b)] = n + 1
        rid = self.rids[id(b)] = str(next(b._ids))
        b.conn.send(msgpack.packb({"t": "buy", "id": rid, "product_id": self.product_id,
                                   "idempotency_key": f"{self.tag}-{self.index[id(b)]}-{n}"}))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        code = "held" if frame["t"] == "reply" else frame.get("code", "?")
        self.codes[code] = self.codes.get(code, 0) + 1
        self.last = time.perf_counter()
        if self.sent[id(b)] < self.buys:
            self.send(b)
        else:
            self._finish()

    def lost(self, why: str) -> None:
        self.codes[why] = self.codes.get(why, 0) + 1
        self._finish()

    def _finish(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


class _Hook:
    """What :class:`Buyer` calls for a rush (its ``rush`` slot): the storm's answers."""

    __slots__ = ("buyer", "storm")

    def __init__(self, storm: _Storm, buyer: Buyer) -> None:
        self.storm, self.buyer = storm, buyer

    @property
    def rid(self) -> str | None:
        return self.storm.rids.get(id(self.buyer))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        self.storm.answered(b, frame)

    def lost(self, b: Buyer, why: str) -> None:
        b.rush = None
        self.storm.lost(why)


async def storm(buyers: list[Buyer], product_id: int, *, buys: int, tag: str,
                within_s: float = 120) -> dict[str, Any]:
    """Every buyer sends ``buys`` buys back to back; the answers by code (``held`` for
    a hold) and the seconds from the first sent to the last answered."""
    s = _Storm(buyers, product_id, buys, tag)
    first = time.perf_counter()
    for b in buyers:
        b.rush = _Hook(s, b)
        s.send(b)
    try:
        await asyncio.wait_for(asyncio.shield(s.done), within_s)
    except TimeoutError:
        s.codes["unanswered"] = len(buyers) * buys - sum(s.codes.values())
    finally:
        for b in buyers:
            b.rush = None
    return {"codes": s.codes, "answers": sum(s.codes.values()),
            "seconds": round(s.last - first, 3)}


async def _phase(server: Server, *, kind: str, sockets: int, buys: int, sources: int,
                 redis_pid: int | None, postgres_pid: int | None,
                 profile: str | None) -> dict[str, Any]:
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    units = 1 if kind == "refusals" else sockets * buys
    drop_id, product_id = await selling_drop(
        server.base_url, issue_token(settings, "bench-creator", Role.CREATOR),
        units=units, per_buyer_limit=min(buys, units), max_holds_per_user=buys)
    tag = f"{kind}-{drop_id}"
    tokens = [issue_token(settings, f"cpu-{i}", Role.VIEWER) for i in range(sockets + 1)]
    everyone = await open_buyers(server.ws_url, drop_id, tokens,
                                 sources=source_addresses(sources))
    first_buyer, buyers = everyone[0], everyone[1:]
    try:
        if kind == "refusals":  # a buyer of its own takes the one unit: sold out
            first = await first_buyer.command("buy", {"product_id": product_id,
                                                      "idempotency_key": f"{tag}-first"})
            if first.get("t") != "reply":
                raise RuntimeError(f"the first buy was refused: {first}")
        await asyncio.sleep(0.5)  # the first hold's notifications out of the way
        cpu = CpuWatch(server, redis_pid, postgres_pid)
        spy = (Profile(os.path.join(profile, kind), {"server": server.proc.pid},
                       with_children=("server",)) if profile else None)
        try:
            result = await storm(buyers, product_id, buys=buys, tag=tag)
        finally:
            spent = cpu.spent()
            if spy is not None:
                spy.stop()
    finally:
        for b in everyone:
            b.close()
    answers = result["answers"]
    want = "sold_out" if kind == "refusals" else "held"
    return {**result, **spent, "ok": result["codes"] == {want: sockets * buys},
            "per_s": round(answers / result["seconds"]) if result["seconds"] else None,
            "server_us_per_answer": round(spent["server_cpu_s"] / answers * 1e6, 1)
            if answers else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.buy_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--buys", type=int, default=10, help="buys per socket per phase")
    parser.add_argument("--sources", type=int, default=4,
                        help="127.0.0.x source addresses to spread sockets over")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--phases", default="refusals,holds",
                        help="comma-separated: refusals, holds (in that order per run)")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the server's workers during each phase "
                             "(DIR/run-N/<phase>/server.txt; not a figure of record)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the dropserver under test (repeatable)")
    ns = parser.parse_args(argv)
    phases = [p for p in ns.phases.split(",") if p]
    if not phases or set(phases) - {"refusals", "holds"}:
        parser.error("--phases takes refusals and/or holds")
    server_env = bench_env(parser, BENCH_LIMITS, ns.server_env)

    client_loop()  # the client's loop, as the server's
    ok = True
    with contextlib.ExitStack() as stack:
        services, server = serve_locally(stack, workers=ns.workers, env=server_env)
        for run in range(ns.runs):
            for kind in phases:
                profile = (os.path.join(ns.profile, f"run-{run + 1}")
                           if ns.profile else None)
                r = asyncio.run(_phase(server, kind=kind, sockets=ns.sockets,
                                       buys=ns.buys, sources=ns.sources, profile=profile,
                                       redis_pid=services.pids.get("redis"),
                                       postgres_pid=services.pids.get("postgres")))
                ok = ok and r["ok"]
                name = "refusal_us" if kind == "refusals" else "hold_us"
                print(json.dumps({"run": run + 1, "phase": kind,
                                  name: r["server_us_per_answer"], "per_s": r["per_s"],
                                  "answers": r["answers"], "codes": r["codes"],
                                  "seconds": r["seconds"],
                                  "server_cpu_s": r["server_cpu_s"],
                                  "server_sys_s": r["server_sys_s"],
                                  "client_cpu_s": r["client_cpu_s"],
                                  "redis_cpu_s": r["redis_cpu_s"],
                                  "postgres_cpu_s": r["postgres_cpu_s"],
                                  "sockets": ns.sockets, "buys": ns.buys,
                                  "workers": ns.workers, "ok": r["ok"]}), flush=True)
                if profile:
                    path = os.path.join(profile, kind, "server.txt")
                    print(json.dumps({"profile": f"server {kind}", **top_frames(path)}),
                          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
