"""checkout/reconcile.py: each way Redis and PostgreSQL can part, made by hand on real
Redis and PostgreSQL with the real scripts and order worker, found and repaired; and
what must not be touched (holds whose entries are still in flight)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from checkout import holds, inventory, keys
from checkout.defense import BuyLimits
from checkout.order_worker import GROUP, OrderWorker
from checkout.orders import OrderProcessor
from checkout.payments import FakeGateway, RedisStore
from checkout.reconcile import reconcile_drop
from checkout.reserve import BuyRequest, reserve
from dropserver.db import create_pool
from dropserver.redis_client import connect as connect_redis
from tests.invariants import check_fake_drop, fake_drop_violations, quiesce
from tests.payments_fixtures import Recorder, make_drop, save_card

OFF = BuyLimits(per_user=0, per_ip=0, velocity_window_ms=0)


@pytest.fixture
async def env(clean_backends) -> AsyncIterator[dict]:
    db = await create_pool(clean_backends.database_url, min_size=1, max_size=5)
    redis = connect_redis(clean_backends.redis_url)
    rec = Recorder()
    proc = OrderProcessor(db, redis, FakeGateway(store=RedisStore(redis)), notify=rec)
    worker = OrderWorker(redis, proc, consumer="rc", block_ms=50, claim_idle_ms=500)
    drop_id, pid = await make_drop(db, units=3)
    await inventory.prewarm(redis, {"id": drop_id, "currency": "usd"},
                            [{"product_id": pid, "price": 2500, "units": 3}])
    await inventory.open_sales(redis, drop_id, pid)
    env = {"db": db, "redis": redis, "proc": proc, "worker": worker, "rec": rec,
           "drop_id": drop_id, "pid": pid, "told": {}}
    try:
        yield env
    finally:
        await worker.stop()
        await redis.aclose()
        await db.close()


async def buy(env, user: str, flow: str = "client_confirm") -> str:
    if flow == "off_session":
        await save_card(env["db"], user)
    h = await reserve(env["redis"], BuyRequest(env["drop_id"], env["pid"], user, "k1",
                                               flow=flow), hold_ttl_ms=60_000, limits=OFF)
    env["told"][h.hold_id] = {"user_id": user, "buyer_number": h.buyer_number}
    return h.hold_id


async def settle(env) -> None:
    """Let the worker process everything, then stop it."""
    env["worker"].start()
    await quiesce(env["redis"], env["drop_id"], within=20, settle=0.2)
    await env["worker"].stop()


def repaired(report) -> list[str]:
    return [kind for kind, _what in report.repairs]


def metric(kind: str) -> float:
    return REGISTRY.get_sample_value("dropserver_reconcile_repairs_total",
                                     {"kind": kind}) or 0.0


async def test_an_agreeing_drop_is_left_alone(env) -> None:
    await buy(env, "u1")
    await buy(env, "u2", "off_session")
    await settle(env)
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert report.checked and report.repairs == [] and report.in_flight == 0
    await check_fake_drop(env)


async def test_holds_in_flight_are_not_repaired(env) -> None:
    """An entry nobody has processed yet (the worker is down, or waiting out an
    outage): its hold has no order row *yet*, which is not a divergence."""
    hold = await buy(env, "u1")
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert report.checked and report.in_flight == 1 and report.repairs == []
    # read but not acknowledged (pending) is still in flight
    await env["redis"].xgroup_create(keys.orders(env["drop_id"]), GROUP, id="0")
    await env["redis"].xreadgroup(GROUP, "slow", {keys.orders(env["drop_id"]): ">"})
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert report.in_flight == 1 and report.repairs == []
    assert await env["db"].fetchval("SELECT count(*) FROM orders WHERE public_id = $1",
                                    hold) == 0


async def test_an_acknowledged_hold_without_an_order_is_requeued(env) -> None:
    """The entry was acknowledged but no order row exists (what the old dead-letter
    path left after a PostgreSQL outage): the reconciler hands the worker a reserve
    entry from the hold's record, and the order is recorded."""
    hold = await buy(env, "u1")
    stream = keys.orders(env["drop_id"])
    await env["redis"].xgroup_create(stream, GROUP, id="0")
    (_, [(eid, _f)]), = await env["redis"].xreadgroup(GROUP, "lost", {stream: ">"})
    await env["redis"].xack(stream, GROUP, eid)
    found = await fake_drop_violations(env)
    assert any(f"acknowledged hold {hold} has 0 order rows" in f for f in found), found
    before = metric("order_requeued")
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert repaired(report) == ["order_requeued"]
    assert metric("order_requeued") == before + 1
    await settle(env)
    assert (await env["db"].fetchval("SELECT state FROM orders WHERE public_id = $1",
                                     hold)) == "payment_pending"
    await check_fake_drop(env)


async def test_a_hold_postgres_released_is_released_in_redis(env, caplog) -> None:
    """PostgreSQL failed the order but Redis still holds its unit (a lost release):
    the product looked sold out while PostgreSQL had units. The repair is logged, with
    the drop, the hold and its kind."""
    hold = await buy(env, "u1")
    await settle(env)
    await env["db"].execute("UPDATE orders SET state = 'failed', released = 'failed' "
                            "WHERE public_id = $1", hold)
    found = await fake_drop_violations(env)
    assert any("Redis has 2 remaining, PostgreSQL 3" in f for f in found), found
    with caplog.at_level("WARNING", logger="dropserver.checkout"):
        report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert repaired(report) == ["hold_released"]
    lines = [r for r in caplog.records if r.getMessage() == "reconciler repaired"]
    assert [(r.drop_id, r.hold_id, r.kind) for r in lines] == [
        (env["drop_id"], hold, "hold_released")]
    assert await inventory.remaining(env["redis"], env["drop_id"]) == {env["pid"]: 3}
    assert (await holds.get_hold(env["redis"], hold))["state"] == "failed"
    await check_fake_drop(env)


async def test_a_lost_paid_mark_is_set_again(env) -> None:
    hold = await buy(env, "u1", "off_session")
    await settle(env)
    d, p = env["drop_id"], env["pid"]
    r = env["redis"]
    await r.hset(keys.hold(d, hold), "state", "held")  # as if mark_paid never ran
    await r.hincrby(keys.open_holds(d, p), "u1", 1)
    await r.zadd(keys.expiry(d), {hold: 2**40})
    report = await reconcile_drop(env["db"], r, d)
    assert repaired(report) == ["hold_paid"]
    assert (await holds.get_hold(r, hold))["state"] == "paid"
    assert await r.zcard(keys.expiry(d)) == 0
    await check_fake_drop(env)


async def _forget_hold(env, hold: str, user: str) -> None:
    """Redis loses one hold (and gives its unit back), as a failover could."""
    d, p, r = env["drop_id"], env["pid"], env["redis"]
    await r.delete(keys.hold(d, hold))
    await r.hincrby(keys.product(d, p), "remaining", 1)
    await r.hdel(keys.units(d, p), user)
    await r.hdel(keys.open_holds(d, p), user)
    await r.zrem(keys.expiry(d), hold)


async def test_a_hold_redis_lost_is_restored(env) -> None:
    hold = await buy(env, "u1")
    paid = await buy(env, "u2", "off_session")
    await settle(env)
    await _forget_hold(env, hold, "u1")
    await _forget_hold(env, paid, "u2")
    assert await inventory.remaining(env["redis"], env["drop_id"]) == {env["pid"]: 3}
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert sorted(repaired(report)) == ["hold_restored", "hold_restored"]
    assert await inventory.remaining(env["redis"], env["drop_id"]) == {env["pid"]: 1}
    assert (await holds.get_hold(env["redis"], hold))["state"] == "held"
    assert (await holds.get_hold(env["redis"], paid))["state"] == "paid"
    assert await env["redis"].zscore(keys.expiry(env["drop_id"]), hold) is not None
    await check_fake_drop(env)


async def test_a_lost_hold_whose_unit_sold_again_fails_its_order(env) -> None:
    """Redis lost an open hold and sold its unit to someone else: restoring it would
    oversell, so the order fails (the worker cancels the intent, tells the buyer)."""
    first = await buy(env, "u1")
    await buy(env, "u2")
    await buy(env, "u3")
    await settle(env)
    await _forget_hold(env, first, "u1")
    await buy(env, "u4")  # takes the unit Redis gave back
    await settle(env)
    report = await reconcile_drop(env["db"], env["redis"], env["drop_id"])
    assert repaired(report) == ["hold_lost"]
    await settle(env)
    row = await env["db"].fetchrow("SELECT state, released FROM orders WHERE public_id = $1",
                                   first)
    assert (row["state"], row["released"]) == ("failed", "failed")
    assert [e["order_id"] for e in env["rec"].of("order.failed")] == [first]
    # the lost hold has no Redis record to compare; everything else agrees
    assert await fake_drop_violations(env) == []


async def test_a_released_hold_postgres_still_counts_is_requeued(env) -> None:
    """Redis released the hold (its expiry) but PostgreSQL has the order paid and the
    release entry never reached the worker: the reconciler sends it again, the worker
    refunds (the unit may be sold again) and records the refund."""
    hold = await buy(env, "u1", "off_session")
    await settle(env)
    d, p, r = env["drop_id"], env["pid"], env["redis"]
    await r.hset(keys.hold(d, hold), "state", "expired")
    await r.hincrby(keys.product(d, p), "remaining", 1)
    await r.hdel(keys.units(d, p), "u1")
    report = await reconcile_drop(env["db"], r, d)
    assert repaired(report) == ["release_requeued"]
    await settle(env)
    row = await env["db"].fetchrow(
        "SELECT o.state, o.released, p.amount_refunded FROM orders o "
        "JOIN payments p ON p.order_id = o.id WHERE o.public_id = $1", hold)
    assert (row["state"], row["released"], row["amount_refunded"]) == (
        "refunded", "expired", 2500)
    await check_fake_drop(env)


async def test_counters_are_set_when_the_drop_is_quiet_only(env) -> None:
    await buy(env, "u1")
    await settle(env)
    d, p, r = env["drop_id"], env["pid"], env["redis"]
    await r.hincrby(keys.product(d, p), "remaining", -1)  # a lost HINCRBY
    await r.hset(keys.units(d, p), "ghost", 1)
    # a buy in flight: the counters are not touched this round
    await buy(env, "u2")
    report = await reconcile_drop(env["db"], r, d)
    assert report.repairs == [] and report.in_flight == 1
    await settle(env)
    report = await reconcile_drop(env["db"], r, d)
    assert repaired(report) == ["counters"]
    assert await inventory.remaining(r, d) == {p: 1}
    assert await r.hget(keys.units(d, p), "ghost") is None
    await check_fake_drop(env)


async def test_counters_follow_the_holds(env) -> None:
    """The state a fault run left (a paid hold still counted as open: its buyer could
    never hold again): the counters are recomputed from the holds, which agree with
    PostgreSQL."""
    hold = await buy(env, "u1", "off_session")
    await settle(env)
    d, p, r = env["drop_id"], env["pid"], env["redis"]
    assert (await holds.get_hold(r, hold))["state"] == "paid"
    await r.hset(keys.open_holds(d, p), "u1", 1)
    found = await fake_drop_violations(env)
    assert any("open holds per buyer differ" in f for f in found), found
    report = await reconcile_drop(env["db"], r, d)
    assert repaired(report) == ["counters"]
    assert await r.hgetall(keys.open_holds(d, p)) == {}
    await check_fake_drop(env)
