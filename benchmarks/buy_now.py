"""Benchmark: how long the creator's BUY NOW takes to reach a subscriber of the drop.

    python -m benchmarks.buy_now --drops 50

Starts ``dropserver dev --port 0`` (its own Redis and PostgreSQL), then for each of
``--drops`` drops with two products: create, schedule, go live, subscribe to the
drop's Redis channel, and time ``POST /v1/drops/{id}/buy-now`` from the request to

* ``event``: the ``drop.buy_now`` message arriving on the channel (what every node's
  gateway receives before fanning out to viewers), and
* ``http``: the response (row lock, ``open_sales``, two publishes, commit).

Go-live (prewarm) and end (close_sales) are timed too. One request at a time, on
loopback; prints one JSON line of milliseconds (p50, p95, max per step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import redis.asyncio as aioredis

from benchmarks._support import pcts, start_dev
from realtime import channels


def _ms(values: list[float]) -> dict[str, float]:
    figures = pcts(values)
    return {k: round(figures[k], 2) for k in ("p50", "p95", "max")}


async def _one(http: httpx.AsyncClient, redis: aioredis.Redis,
               times: dict[str, list[float]]) -> None:
    body = {"title": "bench", "products": [
        {"title": "A", "price": 1000, "units": 300}, {"title": "B", "price": 2000, "units": 5}]}
    drop = (await http.post("/v1/drops", json=body)).raise_for_status().json()
    drop_id, product = drop["id"], drop["products"][0]["product_id"]
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    (await http.post(f"/v1/drops/{drop_id}/schedule", json={"starts_at": starts})
     ).raise_for_status()
    t0 = time.perf_counter()
    (await http.post(f"/v1/drops/{drop_id}/live", json={})).raise_for_status()
    times["live_http"].append((time.perf_counter() - t0) * 1000)

    pubsub = redis.pubsub()
    await pubsub.subscribe(channels.drop_channel(drop_id))
    await pubsub.get_message(timeout=1)            # the subscribe confirmation
    try:
        t0 = time.perf_counter()
        request = asyncio.create_task(
            http.post(f"/v1/drops/{drop_id}/buy-now", json={"product_id": product}))
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if msg is None:
                raise RuntimeError("no drop.buy_now within 5 s")
            pubs = channels.parse_publications(msg["data"])  # drop.state + drop.buy_now
            if any(p.event == "drop.buy_now" for p in pubs):
                times["buy_now_event"].append((time.perf_counter() - t0) * 1000)
                break
        (await request).raise_for_status()
        times["buy_now_http"].append((time.perf_counter() - t0) * 1000)
    finally:
        await pubsub.aclose()
    t0 = time.perf_counter()
    (await http.post(f"/v1/drops/{drop_id}/end", json={})).raise_for_status()
    times["end_http"].append((time.perf_counter() - t0) * 1000)


async def _run(base: str, redis_url: str, token: str, drops: int) -> dict:
    times: dict[str, list[float]] = {"live_http": [], "buy_now_event": [],
                                     "buy_now_http": [], "end_http": []}
    redis = aioredis.Redis.from_url(redis_url)
    async with httpx.AsyncClient(base_url=base, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(3):                       # warm-up: scripts loaded, pools filled
            await _one(http, redis, {k: [] for k in times})
        for _ in range(drops):
            await _one(http, redis, times)
    await redis.aclose()
    return {"drops": drops, "ms": {k: _ms(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drops", type=int, default=50)
    args = parser.parse_args()
    server = start_dev()
    try:
        print(json.dumps(asyncio.run(_run(server.base_url, server.redis_url, server.token,
                                          args.drops))))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
