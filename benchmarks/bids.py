"""Benchmark: bids per second through the real socket path, accepted or refused.

``dropserver serve --workers N`` (real Redis, real PostgreSQL); the creator starts an
auction (long, no anti-snipe window) through the HTTP API; ``--sockets`` bidders
connect over WebSockets, join the drop, and for ``--seconds`` each sends ``bid``
commands one after another (each from the callback that read the answer to the one
before; at most 45 a second per socket, under the gateway's 50): the lowest amount it
last heard was acceptable (from its own answers: an accepted bid's ``next_min``, a
refusal's ``details.min_amount``),
sometimes one or two increments more. Many bidders bid the same amount at once, so
most bids are refused ``bid_too_low`` (the first to arrive wins) and some accepted:
a bidding war's mix. Bids/s = answers (accepted + refused) / time from the first bid
sent to the last answered.

Every answer is checked: accepted bids have sequence numbers 1..n without a gap or a
duplicate, each over the one before it, the auction's leading bid afterwards
(``GET /v1/drops/{id}/auctions/{auction_id}``) is the highest accepted, and no bid
went unanswered (a socket closed, or no answer 30 s after the war); the run exits 1
otherwise. Each run reports the CPU seconds of the server's workers (and their
kernel share), Redis, PostgreSQL and this load generator; ``--profile DIR`` samples
the workers and this process with py-spy.

Run: ``python -m benchmarks.bids`` (``--help`` for sizes). The bid-to-every-viewer
fan-out is ``python -m benchmarks.fanout --servers gateway-bids baseline``. Figures go
to docs/benchmarks.md. The bidders' client is :mod:`benchmarks._buyers`' socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
from collections import Counter
from typing import Any

import msgpack

from benchmarks._buyers import Buyer, open_buyers, source_addresses
from benchmarks._support import (
    CpuWatch,
    Profile,
    Server,
    bench_env,
    client_loop,
    serve_locally,
    top_frames,
)

__all__ = ["main"]

BENCH_LIMITS = {"DROPSERVER_BUY_RATE_USER": "0", "DROPSERVER_BUY_RATE_IP": "0",
                "DROPSERVER_ORDER_WORKERS": "0"}


async def running_auction(base_url: str, creator_token: str) -> tuple[int, int]:
    """A live drop with one unit and a running auction of it (an hour, no anti-snipe)."""
    import httpx

    headers = {"Authorization": f"Bearer {creator_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        resp = await http.post("/v1/drops", json={
            "title": "bids", "products": [{"title": "lot", "price": 100, "units": 1}]})
        resp.raise_for_status()
        drop = resp.json()
        drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
        starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        for action, body in (("schedule", {"starts_at": starts}), ("live", {})):
            resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body)
            resp.raise_for_status()
        resp = await http.post(f"/v1/drops/{drop_id}/auctions", json={
            "product_id": product_id, "start_price": 100, "increment": 1,
            "duration_s": 3600, "snipe_window_s": 0})
        resp.raise_for_status()
        return drop_id, resp.json()["id"]


MIN_GAP_S = 1 / 45  # per socket: under the gateway's 50 frames a second
ANSWER_WAIT_S = 30  # after the war, for the last answers


class _War:
    """What every bidder of a war shares: the lowest amount heard acceptable, the
    answers, the clock."""

    __slots__ = ("accepted", "auction_id", "done", "first", "known_min", "last", "left",
                 "lost", "refused", "rng", "stop_at")

    def __init__(self, auction_id: int, bidders: int, seconds: float) -> None:
        self.auction_id = auction_id
        self.rng = random.Random(1)
        self.accepted: list[tuple[int, int]] = []  # (seq, amount)
        self.refused: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()  # sockets closed with a bid unanswered
        self.known_min = 100
        self.first = self.last = time.perf_counter()
        self.stop_at = self.first + seconds
        self.left = bidders
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        if bidders == 0:
            self.done.set_result(None)


class _Bidder:
    """One bidder's bids, back to back, each sent from the callback that read the
    answer to the one before (the shape of :func:`benchmarks._buyers.rush`: no task,
    future or coroutine per bid, so the load generator, which shares the machine with
    the server it measures, takes as little of it as it can)."""

    __slots__ = ("buyer", "k", "last", "n", "rid", "war")

    def __init__(self, war: _War, buyer: Buyer, n: int) -> None:
        self.war, self.buyer, self.n = war, buyer, n
        self.k = 0
        self.last = 0.0  # when the last bid left
        self.rid: str | None = None  # the id of the bid waiting for its answer
        buyer.rush = self

    def next(self) -> None:
        war = self.war
        now = time.perf_counter()
        if now >= war.stop_at:
            self._finish(self.buyer)
            return
        wait = self.last + MIN_GAP_S - now
        if wait > 0:  # a socket over the gateway's frame rate is not answered
            asyncio.get_running_loop().call_later(wait, self.next)
            return
        self.last = now
        self.k += 1
        amount = war.known_min + war.rng.choice((0, 0, 0, 1, 2))
        b = self.buyer
        rid = self.rid = str(next(b._ids))
        b.conn.send(msgpack.packb({"t": "bid", "id": rid, "auction_id": war.auction_id,
                                   "amount": amount,
                                   "idempotency_key": f"{self.n}-{self.k}"}))

    def answered(self, b: Buyer, frame: dict[str, Any]) -> None:
        war = self.war
        war.last = time.perf_counter()
        if frame.get("t") == "reply":
            d = frame["data"]
            war.accepted.append((d["seq"], d["amount"]))
            war.known_min = max(war.known_min, d["next_min"])
        else:
            war.refused[frame.get("code", "?")] += 1
            floor = (frame.get("details") or {}).get("min_amount")
            if floor:
                war.known_min = max(war.known_min, floor)
        self.next()

    def lost(self, b: Buyer, why: str) -> None:
        self.war.lost[why] += 1
        self._finish(b)

    def _finish(self, b: Buyer) -> None:
        b.rush = None
        war = self.war
        war.left -= 1
        if war.left == 0 and not war.done.done():
            war.done.set_result(None)


async def war(bidders: list[Buyer], auction_id: int, seconds: float) -> dict[str, Any]:
    """Every bidder bids back to back for ``seconds``; the answers, checked."""
    state = _War(auction_id, len(bidders), seconds)
    for n, b in enumerate(bidders):
        bidding = _Bidder(state, b, n)
        if b.closed.done():  # nothing sent on it would ever be answered
            bidding.lost(b, "closed before the war")
        else:
            bidding.next()
    try:
        await asyncio.wait_for(asyncio.shield(state.done), seconds + ANSWER_WAIT_S)
    except TimeoutError:
        for b in bidders:
            if b.rush is not None:
                b.rush.lost(b, "unanswered")
    elapsed = state.last - state.first
    accepted = sorted(state.accepted)
    seqs = [s for s, _ in accepted]
    amounts = [a for _, a in accepted]
    answers = len(accepted) + sum(state.refused.values())
    return {"answers": answers, "accepted": len(accepted), "refused": dict(state.refused),
            "lost": dict(state.lost), "seconds": round(elapsed, 3),
            "per_second": answers / elapsed if elapsed else 0.0,
            "seqs_1_to_n": seqs == list(range(1, len(seqs) + 1)),
            "amounts_rise": all(a < b for a, b in itertools.pairwise(amounts)),
            "top": amounts[-1] if amounts else None}


async def run_once(server: Server, *, sockets: int, seconds: float, sources: int,
                   redis_pid: int | None = None, postgres_pid: int | None = None,
                   profile: str | None = None) -> dict[str, Any]:
    import httpx

    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    drop_id, auction_id = await running_auction(
        server.base_url, issue_token(settings, "bench-creator", Role.CREATOR))
    tokens = [issue_token(settings, f"bidder-{i}", Role.VIEWER) for i in range(sockets)]
    bidders = await open_buyers(server.ws_url, drop_id, tokens,
                                sources=source_addresses(sources))
    cpu = CpuWatch(server, redis_pid, postgres_pid)
    spy = (Profile(profile, {"server": server.proc.pid, "client": os.getpid()},
                   with_children=("server",)) if profile else None)
    try:
        result = await war(bidders, auction_id, seconds)
    finally:
        if spy is not None:
            spy.stop()
        for b in bidders:
            b.close()
    # Where the machine's time went: the server's workers, Redis, and this load
    # generator (which also decodes every accepted bid's event on every bidder's socket).
    result.update(cpu.spent())
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        shown = (await http.get(f"/v1/drops/{drop_id}/auctions/{auction_id}")).json()
    leading = (shown.get("leading") or {}).get("amount")
    return {**result, "leading_is_top": leading == result["top"], "drop_id": drop_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bids",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sources", type=int, default=4,
                        help="127.0.0.x source addresses to spread sockets over")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the server's workers and this client during each "
                             "run (DIR/run-N/{server,client}.txt; not a figure of record)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the dropserver under test (repeatable)")
    ns = parser.parse_args(argv)
    server_env = bench_env(parser, BENCH_LIMITS, ns.server_env)

    client_loop()  # the client's loop, as the server's
    ok = True
    with contextlib.ExitStack() as stack:
        services, server = serve_locally(stack, workers=ns.workers, env=server_env)
        for run in range(ns.runs):
            profile = os.path.join(ns.profile, f"run-{run + 1}") if ns.profile else None
            r = asyncio.run(run_once(server, sockets=ns.sockets, seconds=ns.seconds,
                                     sources=ns.sources, profile=profile,
                                     redis_pid=services.pids.get("redis"),
                                     postgres_pid=services.pids.get("postgres")))
            ok = (ok and r["seqs_1_to_n"] and r["amounts_rise"] and r["leading_is_top"]
                  and not r["lost"])
            print(json.dumps({"run": run + 1, "bids_per_s": round(r["per_second"]),
                              "answers": r["answers"], "accepted": r["accepted"],
                              "refused": r["refused"], "lost": r["lost"],
                              "seconds": r["seconds"],
                              "server_cpu_s": r["server_cpu_s"],
                              "server_sys_s": r["server_sys_s"],
                              "client_cpu_s": r["client_cpu_s"],
                              "redis_cpu_s": r["redis_cpu_s"],
                              "postgres_cpu_s": r["postgres_cpu_s"],
                              "sockets": ns.sockets, "workers": ns.workers,
                              "seqs_1_to_n": r["seqs_1_to_n"],
                              "amounts_rise": r["amounts_rise"],
                              "leading_is_top": r["leading_is_top"]}), flush=True)
            if profile:
                for name in ("server", "client"):
                    print(json.dumps({"profile": name, **top_frames(
                        os.path.join(profile, f"{name}.txt"))}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
