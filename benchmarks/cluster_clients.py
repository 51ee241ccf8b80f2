"""Benchmark: the buy path's Redis call on a Redis Cluster through each candidate client.

    python -m benchmarks.cluster_clients --calls 20000 --concurrency 200

Starts a local cluster (3 primaries, 3 replicas: ``dropserver.local_cluster``),
prewarms one selling product with enough stock, and has ``--concurrency`` coroutines
call ``reserve.lua`` (the buy path's one Redis call, same keys and arguments as
``checkout.reserve``; a new buyer and idempotency key each) until ``--calls`` calls
answered, through:

* ``redis-py``: redis-py's asyncio ``RedisCluster``, ``evalsha`` per call (a
  connection from the node's pool per command in flight);
* ``redis-py+autopipeline``: what the server uses, redis-py's connections under
  :class:`checkout.cluster_pipe.ClusterAutoPipeline` (one auto-pipelined connection
  per primary, routed by slot) -- with ``WAIT 1`` after each batch (the cluster
  default, ``DROPSERVER_HOLD_REPLICAS``) and without;
* ``valkey-glide`` (``GlideClusterClient.invoke_script``; Rust core, one multiplexed
  connection per node) and ``coredis`` (``RedisCluster.evalsha``), when installed
  (``pip install valkey-glide coredis``; neither is a dependency of the server).

Each client gets a product of its own; every answer must be a hold. Prints one JSON
object: calls per second per client. docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from checkout import inventory
from checkout.defense import BuyLimits
from checkout.reserve import BuyRequest, ReserveBatcher, script_call
from checkout.scripts import source
from dropserver.redis_client import cluster_nodes, connect, ready
from dropserver.services import LocalServices

__all__ = ["main"]

LIMITS = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)
DROP = 910_000


async def _prewarm(redis_url: str, product_id: int, units: int) -> None:
    r = connect(redis_url)
    await ready(r)
    try:
        await inventory.prewarm(r, {"id": DROP, "currency": "eur", "max_holds_per_user": 10},
                                [{"product_id": product_id, "price": 100, "units": units,
                                  "per_buyer_limit": 10}])
        await inventory.open_sales(r, DROP, product_id)
    finally:
        await r.aclose()


async def _drive(call: Callable[[list, list], Awaitable[Any]], product_id: int, *,
                 calls: int, concurrency: int) -> float:
    """Calls per second of ``call(keys, args)`` at ``concurrency`` in flight."""
    counter = iter(range(calls))
    holds = 0

    async def worker() -> None:
        nonlocal holds
        for i in counter:
            req = BuyRequest(DROP, product_id, f"c{product_id}-u{i}", f"k{i}")
            keys, args = script_call(req, 600_000, LIMITS)
            reply = await call(keys, args)
            if reply[0] in (b"ok", "ok"):
                holds += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    if holds != calls:
        raise RuntimeError(f"{calls - holds} calls did not get a hold")
    return calls / seconds


async def bench_redis_py(url: str, pid: int, **kw: Any) -> float:
    r = connect(url, max_connections=1000)
    await ready(r)
    sha = await r.script_load(source("reserve"))
    try:
        return await _drive(lambda k, a: r.evalsha(sha, len(k), *k, *a), pid, **kw)
    finally:
        await r.aclose()


async def bench_autopipeline(url: str, pid: int, *, wait_replicas: int, **kw: Any) -> float:
    r = connect(url)
    await ready(r)
    batcher = ReserveBatcher(r, wait_replicas=wait_replicas)
    try:
        return await _drive(batcher.call, pid, **kw)
    finally:
        await batcher.aclose()
        await r.aclose()


async def bench_glide(url: str, pid: int, **kw: Any) -> float:
    from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress, Script

    nodes, _ = cluster_nodes(url)
    client = await GlideClusterClient.create(GlideClusterClientConfiguration(
        [NodeAddress(h, p) for h, p in nodes]))
    script = Script(source("reserve"))
    try:
        return await _drive(lambda k, a: client.invoke_script(
            script, keys=k, args=[str(x) for x in a]), pid, **kw)
    finally:
        await client.close()


async def bench_coredis(url: str, pid: int, **kw: Any) -> float:
    import coredis

    nodes, _ = cluster_nodes(url)
    client = coredis.RedisCluster(startup_nodes=[coredis.connection.TCPLocation(h, p)
                                                 for h, p in nodes[:3]]
                                  if hasattr(coredis.connection, "TCPLocation")
                                  else [{"host": h, "port": p} for h, p in nodes[:3]],
                                  max_connections=1000)
    async with contextlib.AsyncExitStack() as stack:
        if hasattr(client, "__aenter__"):
            client = await stack.enter_async_context(client)
        sha = await client.script_load(source("reserve"))
        return await _drive(lambda k, a: client.evalsha(sha, keys=k, args=a), pid, **kw)


CANDIDATES: dict[str, Callable[..., Awaitable[float]]] = {
    "redis-py": bench_redis_py,
    "redis-py+autopipeline": lambda *a, **kw: bench_autopipeline(*a, wait_replicas=0, **kw),
    "redis-py+autopipeline+WAIT1": lambda *a, **kw: bench_autopipeline(*a, wait_replicas=1,
                                                                       **kw),
    "valkey-glide": bench_glide,
    "coredis": bench_coredis,
}


async def main_async(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.cluster_clients", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {platform.python_version()}",
        "calls": ns.calls, "concurrency": ns.concurrency}
    with LocalServices(want_postgres=False, redis_cluster=True) as services:
        for rnd in range(ns.rounds):
            for i, name in enumerate(ns.clients):
                pid = 1 + rnd * len(CANDIDATES) + i
                await _prewarm(services.redis_url, pid, ns.calls)
                try:
                    rate = await CANDIDATES[name](services.redis_url, pid, calls=ns.calls,
                                                  concurrency=ns.concurrency)
                except ImportError as exc:
                    out.setdefault("skipped", {})[name] = f"not installed ({exc.name})"
                    continue
                out.setdefault(name, []).append(round(rate))
                print(json.dumps({name: round(rate)}), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_clients",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2,
                        help="each client this many times, interleaved")
    parser.add_argument("--clients", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES))
    ns = parser.parse_args(argv)
    print(json.dumps(asyncio.run(main_async(ns)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
