"""Benchmark: Redis' own time per ``reserve.lua`` call, a product without variants
against a variant of one, and (``--base-script``) against another version of the
script, in the same Valkey, alternating.

What variants add to the buy path is inside the script (one more hash read, two more
counter writes, two more keys) and two more arguments to pack; the rest of the path is
unchanged. End-to-end holds/s (``benchmarks.reserve``) carry that difference under a
lot of noise on a shared machine; Redis' ``INFO commandstats`` (``usec_per_call`` of
``EVALSHA``, reset before each batch) measures the script alone, on the server's CPU
time, and varies far less with the load around it.

Each batch: ``--calls`` new holds (distinct buyers and hold ids, so every call takes
stock and writes a hold), pipelined ``--pipeline`` at a time, on a product with
enough stock. Rounds alternate the kinds, so a load spike hits all of them alike.

Run: ``python -m benchmarks.reserve_script --rounds 5`` (``--base-script
path/to/old/reserve.lua`` adds that script, run on a product without variants).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from checkout import inventory, keys
from checkout.scripts import source

__all__ = ["main"]

LIMITS = [10_000, 0, 0, 0, 20]  # window, per user off, per ip off, velocity off


async def _batch(r: Any, sha: str, *, drop_id: int, product_id: int, variant_id: int | None,
                 calls: int, pipeline: int, tag: str) -> dict[str, float]:
    d, p = drop_id, product_id
    await r.config_resetstat()
    started = time.perf_counter()
    for start in range(0, calls, pipeline):
        async with r.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + pipeline, calls)):
                user = f"{tag}{i}"
                hold = (f"{d}-{p}-{i:016x}" if variant_id is None
                        else f"{d}-{p}-{variant_id}-{i:016x}")
                key_list = [keys.meta(d), keys.product(d, p), keys.units(d, p),
                            keys.open_holds(d, p), keys.idem(d), keys.hold(d, hold),
                            keys.expiry(d), keys.orders(d), keys.rate_user(d, user),
                            keys.rate_ip(d, "-")]
                args = [user, 1, "k", hold, 600_000, "", d, p, *LIMITS]
                if variant_id is not None:
                    key_list += [keys.variant(d, p, variant_id),
                                 keys.variant_units(d, p, variant_id)]
                    args.append(variant_id)
                pipe.evalsha(sha, len(key_list), *key_list, *args)
            replies = await pipe.execute()
        bad = [x for x in replies if x[0] != b"ok"]
        if bad:
            raise RuntimeError(f"{tag}: refused {bad[0]}")
    wall = time.perf_counter() - started
    stats = (await r.info("commandstats"))["cmdstat_evalsha"]
    return {"usec_per_call": float(stats["usec_per_call"]), "calls": int(stats["calls"]),
            "wall_per_s": calls / wall}


async def _run(redis_url: str, ns: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        units = ns.calls * ns.rounds * 2
        plain = {"product_id": 1, "price": 2500, "units": units, "per_buyer_limit": 10}
        with_variants = {"product_id": 2, "price": 2500, "per_buyer_limit": 10,
                         "units": units * 2, "variants": [
                             {"variant_id": 21, "units": units, "price": 3000},
                             {"variant_id": 22, "units": units}]}
        drop = {"id": 900_000_003, "max_holds_per_user": 10}
        await inventory.prewarm(r, drop, [plain, with_variants])
        for pid in (1, 2):
            await inventory.open_sales(r, drop["id"], pid)
        await r.srem(keys.ACTIVE_DROPS, drop["id"])
        kinds: dict[str, tuple[str, int, int | None]] = {
            "no_variants": (await r.script_load(source("reserve")), 1, None),
            "variant": (await r.script_load(source("reserve")), 2, 21),
        }
        if ns.base_script:
            base_source = await asyncio.to_thread(Path(ns.base_script).read_text)
            kinds["base_no_variants"] = (
                await r.script_load(base_source), 1, None)
        out: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for rnd in range(ns.rounds):
            for name, (sha, pid, vid) in kinds.items():
                out[name].append(await _batch(
                    r, sha, drop_id=drop["id"], product_id=pid, variant_id=vid,
                    calls=ns.calls, pipeline=ns.pipeline, tag=f"{name}-{rnd}-"))
        summary = {}
        for name, rows in out.items():
            us = [row["usec_per_call"] for row in rows]
            summary[name] = {"usec_per_call": [round(u, 2) for u in us],
                             "median_usec": round(statistics.median(us), 2),
                             "wall_per_s": [round(row["wall_per_s"]) for row in rows]}
        base = summary["no_variants"]["median_usec"]
        summary["variant_over_no_variants"] = round(
            summary["variant"]["median_usec"] / base, 3)
        if "base_no_variants" in summary:
            summary["no_variants_over_base"] = round(
                base / summary["base_no_variants"]["median_usec"], 3)
        return summary
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reserve_script",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--pipeline", type=int, default=200)
    parser.add_argument("--base-script", default="",
                        help="another reserve.lua (e.g. a worktree of an older commit)")
    ns = parser.parse_args(argv)
    from dropserver.services import LocalServices

    with LocalServices(want_postgres=False) as services:
        print(json.dumps(asyncio.run(_run(services.redis_url, ns))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
