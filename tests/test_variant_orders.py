"""Variants past the buy: the order worker records each hold's variant, recovery
rebuilds every variant's counters from PostgreSQL after a Redis loss, the reconciler
repairs a variant's hold and counters, and the invariants check each variant (real
Redis, PostgreSQL, scripts and order worker)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from checkout import holds, inventory, keys, recovery
from checkout.defense import BuyLimits
from checkout.order_worker import OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import FakeGateway, RedisStore
from checkout.reconcile import reconcile_drop
from checkout.reserve import BuyRefused, BuyRequest, Refusal, reserve
from drops import store
from dropserver.db import create_pool
from dropserver.redis_client import connect as connect_redis
from tests.invariants import check_fake_drop, fake_drop_violations, quiesce
from tests.payments_fixtures import Recorder, make_drop, save_card

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)
# S: 2 units; M: 2 units at 3000; L: 1 unit, one per buyer. Two tees per buyer.
SIZES = [("S", 2, None, None), ("M", 2, 3000, None), ("L", 1, None, 1)]


@pytest.fixture
async def env(clean_backends) -> AsyncIterator[dict]:
    db = await create_pool(clean_backends.database_url, min_size=1, max_size=5)
    redis = connect_redis(clean_backends.redis_url)
    rec = Recorder()
    proc = OrderProcessor(db, redis, FakeGateway(store=RedisStore(redis)), notify=rec)
    worker = OrderWorker(redis, proc, consumer="rv", block_ms=50, claim_idle_ms=500)
    drop_id, pid = await make_drop(db, units=5)
    await db.execute("UPDATE drop_products SET per_buyer_limit = 2, state = 'selling', "
                     "selling_at = now() WHERE drop_id = $1", drop_id)
    vids = {}
    for position, (size, units, price, limit) in enumerate(SIZES):
        vids[size] = await db.fetchval(
            "INSERT INTO drop_product_variants (drop_id, product_id, position, title, "
            "options, price, units, per_buyer_limit) "
            "VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8) RETURNING id",
            drop_id, pid, position, size, json.dumps({"size": size}), price, units, limit)
    drop = {"id": drop_id, "currency": "usd", "max_holds_per_user": 2}
    products = (await store.load_products(db, [drop_id]))[drop_id]
    await inventory.prewarm(redis, drop, products)
    await inventory.open_sales(redis, drop_id, pid)
    env = {"db": db, "redis": redis, "proc": proc, "worker": worker, "rec": rec,
           "drop_id": drop_id, "pid": pid, "vids": vids, "told": {}}
    try:
        yield env
    finally:
        await worker.stop()
        await redis.aclose()
        await db.close()


async def buy(env, user: str, size: str, quantity: int = 1, key: str = "k1",
              flow: str = "") -> str:
    if flow == "off_session":
        await save_card(env["db"], user)
    h = await reserve(env["redis"], BuyRequest(env["drop_id"], env["pid"], user, key,
                                               quantity, flow=flow,
                                               variant_id=env["vids"][size]),
                      hold_ttl_ms=60_000, limits=OFF)
    env["told"][h.hold_id] = {"user_id": user, "buyer_number": h.buyer_number}
    return h.hold_id


async def settle(env) -> None:
    env["worker"].start()
    await quiesce(env["redis"], env["drop_id"], within=20, settle=0.2)
    await env["worker"].stop()


async def left(env) -> dict[str, int]:
    per = (await inventory.variants_remaining(env["redis"], env["drop_id"]))[env["pid"]]
    return {size: per[vid] for size, vid in env["vids"].items()}


async def test_store_loads_variants_and_prewarm_takes_them(env) -> None:
    [product] = (await store.load_products(env["db"], [env["drop_id"]]))[env["drop_id"]]
    assert [(v["title"], v["options"], v["price"], v["units"], v["per_buyer_limit"])
            for v in product["variants"]] == [
        ("S", {"size": "S"}, None, 2, None), ("M", {"size": "M"}, 3000, 2, None),
        ("L", {"size": "L"}, None, 1, 1)]
    assert await left(env) == {"S": 2, "M": 2, "L": 1}
    assert await inventory.remaining(env["redis"], env["drop_id"]) == {env["pid"]: 5}


async def test_the_worker_records_each_orders_variant_and_price(env) -> None:
    m = await buy(env, "u1", "M")
    s = await buy(env, "u2", "S", quantity=2)
    await settle(env)
    rows = {r["public_id"]: r for r in await env["db"].fetch(
        "SELECT public_id, variant_id, unit_price, amount FROM orders WHERE drop_id = $1",
        env["drop_id"])}
    assert (rows[m]["variant_id"], rows[m]["unit_price"]) == (env["vids"]["M"], 3000)
    assert (rows[s]["variant_id"], rows[s]["amount"]) == (env["vids"]["S"], 5000)
    await check_fake_drop(env)


async def test_a_redis_loss_rebuilds_every_variant_from_postgres(env) -> None:
    await buy(env, "u1", "L")
    await buy(env, "u2", "M", quantity=2)
    hold = await buy(env, "u3", "S")
    await settle(env)
    await holds.release(env["redis"], hold, holds.Reason.CANCELLED, owner="u3")
    await settle(env)
    before = await left(env)
    assert before == {"S": 2, "M": 0, "L": 0}
    await env["redis"].flushall()
    assert await recovery.rebuild(env["db"], env["redis"], env["drop_id"], grace_ms=0)
    assert await left(env) == before
    assert await inventory.remaining(env["redis"], env["drop_id"]) == {env["pid"]: 2}
    # The per-variant limit survived with its units per buyer: u1 had the one L.
    with pytest.raises(BuyRefused) as err:
        await buy(env, "u1", "L", key="k2")
    assert err.value.refusal is Refusal.LIMIT_REACHED
    with pytest.raises(BuyRefused) as err:
        await buy(env, "u4", "M")
    assert err.value.refusal is Refusal.SOLD_OUT
    await buy(env, "u4", "S", key="k3")
    await settle(env)
    await check_fake_drop(env)


async def test_the_reconciler_returns_a_failed_orders_unit_to_its_variant(env) -> None:
    hold = await buy(env, "u1", "L")
    await settle(env)
    await env["db"].execute("UPDATE orders SET state = 'failed', released = 'failed' "
                            "WHERE public_id = $1", hold)
    found = await fake_drop_violations(env)
    assert any(f"variant {env['vids']['L']}: Redis has 0 remaining, PostgreSQL 1" in f
               for f in found), found
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert [k for k, _ in report.repairs] == ["hold_released"]
    assert await left(env) == {"S": 2, "M": 2, "L": 1}
    await check_fake_drop(env)


async def test_the_reconciler_restores_a_lost_variant_hold(env) -> None:
    hold = await buy(env, "u1", "M", quantity=2)
    await settle(env)
    d, p, v, r = env["drop_id"], env["pid"], env["vids"]["M"], env["redis"]
    # Redis loses the hold and gives its units back, to the product and the variant.
    await r.delete(keys.hold(d, hold))
    await r.hincrby(keys.product(d, p), "remaining", 2)
    await r.hincrby(keys.variant(d, p, v), "remaining", 2)
    await r.hdel(keys.units(d, p), "u1")
    await r.hdel(keys.variant_units(d, p, v), "u1")
    await r.hdel(keys.open_holds(d, p), "u1")
    await r.zrem(keys.expiry(d), hold)
    report = await reconcile_drop(env["db"], r, d)
    assert [k for k, _ in report.repairs] == ["hold_restored"]
    assert await left(env) == {"S": 2, "M": 0, "L": 1}
    assert await r.hget(keys.variant_units(d, p, v), "u1") == b"2"
    await check_fake_drop(env)


async def test_the_reconciler_sets_a_variants_counters(env) -> None:
    await buy(env, "u1", "S")
    await settle(env)
    d, p, r = env["drop_id"], env["pid"], env["redis"]
    s, m = env["vids"]["S"], env["vids"]["M"]
    await r.hincrby(keys.variant(d, p, m), "remaining", -1)  # a lost HINCRBY
    await r.hset(keys.variant_units(d, p, s), "ghost", 1)
    found = await fake_drop_violations(env)
    assert any(f"variant {m}: Redis has 1 remaining, PostgreSQL 2" in f for f in found)
    assert any(f"variant {s}: units per buyer differ" in f for f in found)
    report = await reconcile_drop(env["db"], r, d)
    assert [k for k, _ in report.repairs] == ["counters"]
    assert await left(env) == {"S": 1, "M": 2, "L": 1}
    assert await r.hgetall(keys.variant_units(d, p, s)) == {b"u1": b"1"}
    await check_fake_drop(env)


async def test_the_invariants_catch_a_variant_oversold(env) -> None:
    await buy(env, "u1", "L")
    await settle(env)
    # A second L order written behind Redis' back: more L in orders than exist.
    await env["db"].execute(
        "INSERT INTO users (id) VALUES ('u9') ON CONFLICT DO NOTHING")
    await env["db"].execute(
        "INSERT INTO orders (public_id, drop_id, product_id, variant_id, user_id, "
        "buyer_number, unit_price, amount, currency, idempotency_key, state, "
        "hold_expires_at) VALUES ($1, $2, $3, $4, 'u9', 99, 2500, 2500, 'usd', 'x', "
        "'held', now() + interval '1 minute')",
        f"{env['drop_id']}-{env['pid']}-{env['vids']['L']}-00000000000000ff",
        env["drop_id"], env["pid"], env["vids"]["L"])
    found = await fake_drop_violations(env)
    assert any(f"variant {env['vids']['L']}: 2 units in live orders, only 1 exist" in f
               for f in found), found


async def test_the_settlement_report_says_what_each_variant_sold(env) -> None:
    from drops import settlement_store

    await buy(env, "u1", "M", quantity=2, flow="off_session")
    await buy(env, "u2", "S", flow="off_session")
    await buy(env, "u3", "L")  # held, not paid: not in the sales
    await settle(env)
    report = await settlement_store.report(env["db"], env["drop_id"])
    v = env["vids"]
    assert report["sales"] == [
        {"product_id": env["pid"], "variant_id": v["S"], "orders": 1, "units": 1,
         "received": 2500, "refunded": 0},
        {"product_id": env["pid"], "variant_id": v["M"], "orders": 1, "units": 2,
         "received": 6000, "refunded": 0}]
    assert report["totals"]["gross"] == sum(x["received"] for x in report["sales"])
    await check_fake_drop(env)
