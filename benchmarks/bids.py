"""Benchmark: bids per second through the real socket path, accepted or refused.

``dropserver serve --workers N`` (real Redis, real PostgreSQL); the creator starts an
auction (long, no anti-snipe window) through the HTTP API; ``--sockets`` bidders
connect over WebSockets, join the drop, and for ``--seconds`` each sends ``bid``
commands one after another: the lowest amount it last heard was acceptable (from its
own answers: an accepted bid's ``next_min``, a refusal's ``details.min_amount``),
sometimes one or two increments more. Many bidders bid the same amount at once, so
most bids are refused ``bid_too_low`` (the first to arrive wins) and some accepted:
a bidding war's mix. Bids/s = answers (accepted + refused) / time from the first bid
sent to the last answered.

Every answer is checked: accepted bids have sequence numbers 1..n without a gap or a
duplicate, each over the one before it, and the auction's leading bid afterwards
(``GET /v1/drops/{id}/auctions/{auction_id}``) is the highest accepted.

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
import random
import sys
import time
from collections import Counter
from typing import Any

from benchmarks._buyers import Buyer, open_buyers, source_addresses
from benchmarks._support import Server, cpu_seconds, start_server

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


async def war(bidders: list[Buyer], auction_id: int, seconds: float) -> dict[str, Any]:
    """Every bidder bids back to back for ``seconds``; the answers, checked."""
    rng = random.Random(1)
    accepted: list[tuple[int, int]] = []  # (seq, amount)
    refused: Counter[str] = Counter()
    known = {"min": 100}
    first = time.perf_counter()
    last = [first]
    stop_at = first + seconds

    async def bidder(b: Buyer, n: int) -> None:
        k = 0
        while time.perf_counter() < stop_at and not b.closed.done():
            k += 1
            amount = known["min"] + rng.choice((0, 0, 0, 1, 2))
            frame = await b.command("bid", {"auction_id": auction_id, "amount": amount,
                                            "idempotency_key": f"{n}-{k}"})
            last[0] = time.perf_counter()
            if frame.get("t") == "reply":
                d = frame["data"]
                accepted.append((d["seq"], d["amount"]))
                known["min"] = max(known["min"], d["next_min"])
            else:
                refused[frame.get("code", "?")] += 1
                floor = (frame.get("details") or {}).get("min_amount")
                if floor:
                    known["min"] = max(known["min"], floor)

    await asyncio.gather(*(bidder(b, n) for n, b in enumerate(bidders)))
    elapsed = last[0] - first
    accepted.sort()
    seqs = [s for s, _ in accepted]
    amounts = [a for _, a in accepted]
    answers = len(accepted) + sum(refused.values())
    return {"answers": answers, "accepted": len(accepted), "refused": dict(refused),
            "seconds": round(elapsed, 3),
            "per_second": answers / elapsed if elapsed else 0.0,
            "seqs_1_to_n": seqs == list(range(1, len(seqs) + 1)),
            "amounts_rise": all(a < b for a, b in itertools.pairwise(amounts)),
            "top": amounts[-1] if amounts else None}


async def run_once(server: Server, *, sockets: int, seconds: float, sources: int,
                   ) -> dict[str, Any]:
    import httpx

    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    drop_id, auction_id = await running_auction(
        server.base_url, issue_token(settings, "bench-creator", Role.CREATOR))
    tokens = [issue_token(settings, f"bidder-{i}", Role.VIEWER) for i in range(sockets)]
    bidders = await open_buyers(server.ws_url, drop_id, tokens,
                                sources=source_addresses(sources))
    from loadtest.procstat import server_processes

    workers = [p.pid for p in server_processes(server.proc.pid)]
    server_cpu, client_cpu = sum(cpu_seconds(w) for w in workers), time.process_time()
    try:
        result = await war(bidders, auction_id, seconds)
    finally:
        for b in bidders:
            b.close()
    # Where the machine's time went: the server's workers, and this load generator
    # (which also decodes every accepted bid's event on every bidder's socket).
    result["server_cpu_s"] = round(sum(cpu_seconds(w) for w in workers) - server_cpu, 2)
    result["client_cpu_s"] = round(time.process_time() - client_cpu, 2)
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
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the dropserver under test (repeatable)")
    ns = parser.parse_args(argv)
    server_env = dict(BENCH_LIMITS)
    for item in ns.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env wants NAME=VALUE, got {item!r}")
        server_env[name] = value

    from dropserver.db import migrate_database
    from dropserver.services import LocalServices

    with contextlib.suppress(ImportError):  # the client's loop, as the server's
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    ok = True
    with contextlib.ExitStack() as stack:
        services = stack.enter_context(LocalServices())
        asyncio.run(migrate_database(services.database_url))
        server = start_server(services.redis_url, services.database_url,
                              workers=ns.workers, env=server_env)
        stack.callback(server.stop)
        for run in range(ns.runs):
            r = asyncio.run(run_once(server, sockets=ns.sockets, seconds=ns.seconds,
                                     sources=ns.sources))
            ok = ok and r["seqs_1_to_n"] and r["amounts_rise"] and r["leading_is_top"]
            print(json.dumps({"run": run + 1, "bids_per_s": round(r["per_second"]),
                              "answers": r["answers"], "accepted": r["accepted"],
                              "refused": r["refused"], "seconds": r["seconds"],
                              "server_cpu_s": r["server_cpu_s"],
                              "client_cpu_s": r["client_cpu_s"],
                              "sockets": ns.sockets, "workers": ns.workers,
                              "seqs_1_to_n": r["seqs_1_to_n"],
                              "amounts_rise": r["amounts_rise"],
                              "leading_is_top": r["leading_is_top"]}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
