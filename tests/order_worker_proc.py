"""A one-shot order worker process for the crash test (tests/test_orders.py).

``python -m tests.order_worker_proc REDIS_URL DATABASE_URL STRIPE_URL crash-after-intent
[BLOCK_MS]`` consumes as consumer ``doomed`` and SIGKILLs itself right after the first
PaymentIntent exists and before PostgreSQL records it: the worst moment for a crash.
Mode ``crash-in-fake-gateway`` (STRIPE_URL unused) pays through the fake gateway with
its objects in Redis, as a server does, and SIGKILLs itself inside the first
PaymentIntent request, its idempotency key taken and not answered.
It prints ``ready`` once it waits for entries: started before a rush, with a long
BLOCK_MS, it is first in line for the first entry (Redis serves blocked readers in
order) even beside a server's own workers (tests/fault_rig.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from checkout.fake_gateway import FakeGateway, RedisStore
from checkout.order_worker import OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import Intent, StripeGateway
from dropserver.db import create_pool
from dropserver.redis_client import connect as connect_redis


async def main(redis_url: str, database_url: str, stripe_url: str, mode: str,
               block_ms: str = "200") -> None:
    db = await create_pool(database_url, min_size=1, max_size=2)
    redis = connect_redis(redis_url)
    gateway: Any = StripeGateway("sk_test_x", api_base=stripe_url, max_network_retries=0)
    if mode == "crash-in-fake-gateway":
        class DiesInRequest(RedisStore):
            async def add(self, kind: str, key: str, value: Any) -> bool:
                if kind == "intent":
                    print("in the PaymentIntent request; dying", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                return await super().add(kind, key, value)
        gateway = FakeGateway(store=DiesInRequest(redis))

    # the real notifier: beside a server's workers it tells buyers like them (a no-op
    # here would mark outcomes told that nobody heard)
    proc = OrderProcessor(db, redis, gateway)
    if mode == "crash-after-intent":
        async def crash(intent: Intent) -> None:
            print("intent", intent.id, "created; dying", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        proc.after_intent = crash
    worker = OrderWorker(redis, proc, consumer="doomed", block_ms=int(block_ms))
    await worker.refresh_streams(force=True)
    print("ready", flush=True)
    for _ in range(50):
        await worker.run_once()
    print("no entry arrived", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
