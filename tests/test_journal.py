"""checkout/journal.py: an acknowledged hold reaches PostgreSQL from the process that
made it, so a Redis that restarts empty before any order worker read the stream does
not take it along; and a hold arriving after a rebuild read is recorded lost, never
counted (checkout.orders.insert_orders)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from checkout import inventory, keys, recovery
from checkout.reconcile import reconcile_drop
from dropserver.auth import Role
from tests.invariants import check, quiesce
from tests.payments_fixtures import wait_for
from tests.test_reserve_api import bearer, post_buy, selling_drop


@pytest.fixture
def settings(settings):  # no order worker: only the journal can record the holds
    return settings.replace(order_workers=0, reconcile_interval=0.0)


async def test_an_acknowledged_hold_survives_redis_restarting_empty(
        server, http, make_token) -> None:
    app = server.app
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=3)
    told = {}
    for user in ("j1", "j2"):
        resp = await post_buy(http, drop_id, bearer(make_token(user, Role.VIEWER)), pid)
        assert resp.status_code == 201
        told[resp.json()["hold_id"]] = {"user_id": user,
                                        "buyer_number": resp.json()["buyer_number"]}
    db = await asyncpg.connect(app.state.settings.database_url)
    try:
        async def both():
            found = await db.fetch("SELECT public_id, user_id, buyer_number, state "
                                   "FROM orders WHERE drop_id = $1", drop_id)
            return found if len(found) == 2 else None
        rows = await wait_for(both, 5)
        assert {r["public_id"]: (r["user_id"], r["buyer_number"], r["state"])
                for r in rows} == {h: (t["user_id"], t["buyer_number"], "held")
                                   for h, t in told.items()}
        # Redis restarts empty: the stream, its two entries and the holds are gone.
        await app.state.redis.flushall()
        assert await recovery.rebuild(app.state.db, app.state.redis, drop_id, grace_ms=0)
        assert await inventory.remaining(app.state.redis, drop_id) == {pid: 1}
        # Nobody will process the lost entries: the reconciler hands them back.
        report = await reconcile_drop(app.state.db, app.state.redis, drop_id)
        assert sorted(k for k, _ in report.repairs) == ["order_requeued", "order_requeued"]
        from checkout.order_worker import OrderWorker

        worker = OrderWorker(app.state.redis, app.state.order_processor, consumer="late",
                             block_ms=50)
        worker.start()
        try:
            await quiesce(app.state.redis, drop_id, within=20)
        finally:
            await worker.stop()
        states = {r["public_id"]: r["state"] for r in await db.fetch(
            "SELECT public_id, state FROM orders WHERE drop_id = $1", drop_id)}
        assert states == dict.fromkeys(told, "payment_pending")
        await check(db, app.state.redis, drop_id, acknowledged=told)
    finally:
        await db.close()


async def test_a_hold_arriving_after_a_rebuild_read_is_recorded_lost(
        server, http, make_token) -> None:
    """PostgreSQL was away when Redis was rebuilt without a hold, which arrives only
    afterwards: its unit may have been sold again, so it is recorded failed (released
    'lost'), not counted, and its buyer told hold_lost."""
    from checkout.order_rows import insert_orders

    app = server.app
    creator = bearer(make_token("creator-1", Role.CREATOR))
    drop_id, pid = await selling_drop(http, creator, units=1)
    db = await asyncpg.connect(app.state.settings.database_url)
    try:
        made = int(time.time() * 1000)
        await asyncio.sleep(0.01)
        await app.state.redis.flushall()
        assert await recovery.rebuild(app.state.db, app.state.redis, drop_id, grace_ms=0)
        assert await db.fetchval("SELECT count(*) FROM drop_rebuilds WHERE drop_id = $1",
                                 drop_id) == 1
        late = keys.new_hold_id(drop_id, pid)
        async with db.transaction():
            await insert_orders(db, [(late, drop_id, pid, "late-buyer", 1, 1, 4500, 4500,
                                      "usd", "k1", made + 600_000, "client_confirm", made,
                                      "held", None)])
        row = await db.fetchrow("SELECT state, released FROM orders WHERE public_id = $1",
                                late)
        assert (row["state"], row["released"]) == ("failed", "lost")
        # a hold made after the read is recorded as usual
        fresh = keys.new_hold_id(drop_id, pid)
        now = int(time.time() * 1000)
        async with db.transaction():
            await insert_orders(db, [(fresh, drop_id, pid, "new-buyer", 1, 2, 4500, 4500,
                                      "usd", "k1", now + 600_000, "client_confirm", now,
                                      "held", None)])
        assert await db.fetchval("SELECT state FROM orders WHERE public_id = $1",
                                 fresh) == "held"
        # the lost one's buyer hears it, with the reason
        heard = []

        async def record(_redis, user, event, data):
            heard.append((user, event, data))

        proc = app.state.order_processor
        proc.notify = record
        order = await proc.order(late)
        assert await proc.tell(order)
        assert heard == [("late-buyer", "order.failed", {
            "order_id": late, "drop_id": drop_id, "product_id": pid,
            "reason": "hold_lost", "message": heard[0][2]["message"]})]
    finally:
        await db.close()
