"""Benchmark: order-worker throughput, holds in the stream to orders paid in PostgreSQL.

A fresh Valkey and PostgreSQL (the launcher of ``dropserver dev``); one drop, one
product with ``--orders`` units; that many buyers with a saved card each make one hold
through the real ``reserve.lua`` (off-session flow), so the stream holds ``--orders``
reserve entries. Then ``--workers`` consumers (one process) start and the clock runs
until every order is ``paid`` in PostgreSQL. Per order: the ``orders`` INSERT, the
PaymentIntent, the ``payments`` INSERT, the state UPDATE, ``mark_paid`` in Redis, the
buyer's ``order.paid`` publish, XACK.

Gateways: ``fake`` (in memory here; the server keeps it in Redis) or ``stub`` (the real stripe SDK
over HTTP to tests/stripe_stub.py on loopback; run from the repository root), which
shows what the SDK's request path costs.

Run: ``python -m benchmarks.orders --orders 2000 --gateway fake``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis.asyncio as aioredis

from checkout import inventory
from checkout.defense import BuyLimits
from checkout.order_worker import OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import FakeGateway, Gateway, StripeGateway
from checkout.reserve import BuyRequest, reserve
from dropserver.db import create_pool, migrate_database
from dropserver.services import LocalServices


async def run(args: argparse.Namespace, redis_url: str, database_url: str) -> dict:
    await migrate_database(database_url)
    db = await create_pool(database_url, min_size=2, max_size=20)
    redis = aioredis.Redis.from_url(redis_url, max_connections=200)
    stub = None
    gateway: Gateway
    if args.gateway == "stub":
        from tests.stripe_stub import StripeStub

        stub = StripeStub().start()
        gateway = StripeGateway("sk_test_bench", api_base=stub.url, max_network_retries=0)
    else:
        gateway = FakeGateway()
    n = args.orders
    await db.execute("INSERT INTO users (id, role) VALUES ('creator', 'creator')")
    pid = await db.fetchval("INSERT INTO products (creator_id, title) "
                            "VALUES ('creator', 'Tee') RETURNING id")
    did = await db.fetchval("INSERT INTO drops (creator_id, title, state) "
                            "VALUES ('creator', 'Bench', 'selling') RETURNING id")
    await db.execute("INSERT INTO drop_products (drop_id, product_id, price, units) "
                     "VALUES ($1, $2, 2500, $3)", did, pid, n)
    await db.executemany(
        "INSERT INTO users (id, default_payment_method, stripe_customer_id) "
        "VALUES ($1, 'pm_card_visa', $2)", [(f"b{i}", f"cus_b{i}") for i in range(n)])
    await inventory.prewarm(redis, {"id": did, "currency": "usd"},
                            [{"product_id": pid, "price": 2500, "units": n}])
    await inventory.open_sales(redis, did, pid)
    limits = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0, velocity_max=0)
    for i in range(n):
        await reserve(redis, BuyRequest(did, pid, f"b{i}", f"k{i}", flow="off_session"),
                      hold_ttl_ms=600_000, limits=limits)

    async def notify(r, user_id: str, event: str, data: dict) -> None:
        from realtime.publish import publish_user

        await publish_user(r, user_id, event, data)

    proc = OrderProcessor(db, redis, gateway, notify=notify)
    workers = [OrderWorker(redis, proc, consumer=f"bench-{i}", block_ms=50)
               for i in range(args.workers)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    while True:
        paid = await db.fetchval("SELECT count(*) FROM orders WHERE state = 'paid'")
        if paid >= n:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    for w in workers:
        await w.stop()
    if isinstance(gateway, FakeGateway):
        intents = len(await gateway.store.values("intent"))
    else:
        intents = len(stub.intents)
    await gateway.close()
    if stub is not None:
        stub.stop()
    await redis.aclose()
    await db.close()
    return {"orders": n, "workers": args.workers, "gateway": args.gateway,
            "seconds": round(elapsed, 3), "orders_per_s": round(n / elapsed, 1),
            "intents": intents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gateway", choices=("fake", "stub"), default="fake")
    args = parser.parse_args()
    with LocalServices() as services:
        result = asyncio.run(run(args, services.redis_url, services.database_url))
    print(result)


if __name__ == "__main__":
    main()
