"""tests/invariants.py: the shared invariant checks find each kind of breakage.

A drop sells through the real scripts and the real order worker (fake gateway in
Redis, as a server runs it); then each test breaks one thing by hand and expects
exactly that to be reported."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from checkout import holds, inventory, keys
from checkout.defense import BuyLimits
from checkout.order_worker import OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import FakeGateway, RedisStore
from checkout.reserve import BuyRequest, reserve
from dropserver.db import create_pool
from dropserver.redis_client import connect as connect_redis
from tests.invariants import check_fake_drop, fake_drop_violations, quiesce, violations
from tests.payments_fixtures import Recorder, make_drop, save_card

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)


@pytest.fixture
async def sold(clean_backends) -> AsyncIterator[dict]:
    """Drop with 5 units: u0 and u1 paid (saved cards), u2 holds, u3 cancelled."""
    db = await create_pool(clean_backends.database_url, min_size=1, max_size=4)
    redis = connect_redis(clean_backends.redis_url)
    gateway = FakeGateway(store=RedisStore(redis))
    proc = OrderProcessor(db, redis, gateway, notify=Recorder())
    worker = OrderWorker(redis, proc, consumer="inv", block_ms=50)
    drop_id, pid = await make_drop(db, units=5)
    await inventory.prewarm(redis, {"id": drop_id, "currency": "usd"},
                            [{"product_id": pid, "price": 2500, "units": 5}])
    await inventory.open_sales(redis, drop_id, pid)
    told = {}
    for i, flow in enumerate(["off_session", "off_session", "client_confirm",
                              "client_confirm"]):
        user = f"u{i}"
        if flow == "off_session":
            await save_card(db, user)
        h = await reserve(redis, BuyRequest(drop_id, pid, user, f"k{i}", flow=flow),
                          hold_ttl_ms=60_000, limits=OFF)
        told[h.hold_id] = {"user_id": user, "buyer_number": h.buyer_number}
    cancelled = list(told)[3]
    await holds.release(redis, cancelled, "cancelled", owner="u3")
    worker.start()
    await quiesce(redis, drop_id, within=20)
    env = {"db": db, "redis": redis, "drop_id": drop_id, "pid": pid, "told": told,
           "gateway": gateway, "worker": worker}
    try:
        yield env
    finally:
        await worker.stop()
        await redis.aclose()
        await db.close()


async def test_a_clean_drop_keeps_every_invariant(sold) -> None:
    await check_fake_drop(sold)
    states = sorted(r["state"] for r in await sold["db"].fetch("SELECT state FROM orders"))
    assert states == ["cancelled", "paid", "paid", "payment_pending"]


async def test_a_lost_hold_is_reported(sold) -> None:
    ghost = keys.new_hold_id(sold["drop_id"], sold["pid"])
    found = await violations(sold["db"], sold["redis"], sold["drop_id"],
                             acknowledged={**sold["told"], ghost: {}})
    assert found == [f"acknowledged hold {ghost} has 0 order rows"]


async def test_a_wrong_buyer_number_is_reported(sold) -> None:
    hold = next(iter(sold["told"]))
    told = {**sold["told"], hold: {"user_id": "u0", "buyer_number": 99}}
    found = await violations(sold["db"], sold["redis"], sold["drop_id"], acknowledged=told)
    assert len(found) == 1 and "buyer_number=99" in found[0]


async def test_redis_stock_off_by_one_is_reported(sold) -> None:
    await sold["redis"].hincrby(keys.product(sold["drop_id"], sold["pid"]), "remaining", -1)
    found = await fake_drop_violations(sold)
    assert len(found) == 1 and "Redis has 1 remaining, PostgreSQL 2" in found[0], found


async def test_an_oversold_product_and_a_buyer_over_the_limit(sold) -> None:
    db = sold["db"]
    await db.execute("UPDATE drop_products SET units = 2, per_buyer_limit = 1")
    await db.execute("UPDATE orders SET quantity = 2 WHERE user_id = 'u2'")
    found = await violations(db, sold["redis"], sold["drop_id"], redis_checks=False)
    pid = sold["pid"]
    assert f"product {pid}: 4 units in live orders, only 2 exist" in found
    assert f"product {pid}: buyer u2 holds 2 units, the limit is 1" in found


async def test_an_unrecorded_refund_is_reported(sold) -> None:
    """The gateway refunded a paid order's charge; PostgreSQL still says paid."""
    intent = await sold["db"].fetchval(
        "SELECT p.intent_id FROM payments p JOIN orders o ON o.id = p.order_id "
        "WHERE o.user_id = 'u0'")
    await sold["gateway"].refund(intent, idempotency_key="r:test")
    found = await fake_drop_violations(sold)
    assert any("is paid: the gateway keeps [], expected [2500]" in f for f in found), found
    assert any("the gateway refunded 2500, PostgreSQL records 0" in f for f in found)
    assert any("the gateway keeps 2500 for this drop, paid orders are 5000" in f
               for f in found)


async def test_money_kept_for_an_unpaid_order_is_reported(sold) -> None:
    db = sold["db"]
    await db.execute("UPDATE orders SET state = 'expired' WHERE user_id = 'u1'")
    found = await violations(db, sold["redis"], sold["drop_id"], redis_checks=False)
    assert any("is expired but PostgreSQL keeps 2500" in f for f in found), found


async def test_a_redis_hold_postgres_does_not_know_is_reported(sold) -> None:
    db = sold["db"]
    hold = await db.fetchval("SELECT public_id FROM orders WHERE user_id = 'u2'")
    await db.execute("DELETE FROM payments WHERE order_id = "
                     "(SELECT id FROM orders WHERE user_id = 'u2')")
    await db.execute("DELETE FROM orders WHERE user_id = 'u2'")
    found = await violations(db, sold["redis"], sold["drop_id"])
    assert any(f"Redis counts hold {hold}" in f for f in found), found
    assert any("acknowledged" not in f for f in found)


async def test_state_mismatch_between_redis_and_postgres_is_reported(sold) -> None:
    db = sold["db"]
    hold = await db.fetchval("SELECT public_id FROM orders WHERE user_id = 'u2'")
    await sold["worker"].stop()
    await holds.release(sold["redis"], hold, "cancelled", owner="u2")  # not processed yet
    found = await violations(db, sold["redis"], sold["drop_id"])
    assert any(f"order {hold} is payment_pending in PostgreSQL, its hold is cancelled"
               in f for f in found), found
