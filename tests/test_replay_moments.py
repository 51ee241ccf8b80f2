"""The replay's moment recorder (streaming.replay.MomentRecorder) hears a drop's
channel on one Redis and on a Redis Cluster (where the server publishes with SPUBLISH,
which a classic SUBSCRIBE never hears), stores each moment once, and fills from the
drop's history what was published while its subscription was down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from dropserver.redis_client import connect, ready
from realtime.publish import publish, publish_many, publish_volatile
from streaming.replay import MomentRecorder
from tests.conftest import only_single_redis
from tests.realtime_support import create_drop


@pytest.fixture
async def db(backends) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(backends.database_url, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def _kinds(db: asyncpg.Pool, drop_id: int, want: int, within: float = 10.0,
                 ) -> list[tuple[str, int | None, int]]:
    """The drop's moments once ``want`` are stored (or whatever is there at ``within``),
    then 0.3 s more, so a moment stored twice would show."""
    deadline = time.monotonic() + within
    while True:
        rows = await db.fetch("SELECT kind, product_id, media_ms FROM replay_moments "
                              "WHERE drop_id = $1 ORDER BY id", drop_id)
        if len(rows) >= want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    rows = await db.fetch("SELECT kind, product_id, media_ms FROM replay_moments "
                          "WHERE drop_id = $1 ORDER BY id", drop_id)
    return [(r["kind"], r["product_id"], r["media_ms"]) for r in rows]


async def _record_a_drop(redis_url: str, database_url: str, db: asyncpg.Pool) -> None:
    drop_id, (pid,) = await create_drop(database_url)
    r = connect(redis_url)
    await ready(r)
    recorder = MomentRecorder(r, db, drop_id, media_ms=lambda: 1234, redis_url=redis_url)
    await recorder.start()
    try:
        await publish(r, drop_id, "drop.pinned", {"product_id": pid})
        await publish_many(r, drop_id, [("drop.state", {"state": "on_sale"}),
                                        ("drop.buy_now", {"product_id": pid})])
        await publish_volatile(r, drop_id, "stock", {"product_id": pid, "left": 3})
        await publish(r, drop_id, "drop.sold_out", {"product_id": str(pid)})
        assert await _kinds(db, drop_id, 3) == [
            ("pinned", pid, 1234), ("buy_now", pid, 1234), ("sold_out", pid, 1234)]
    finally:
        await recorder.stop()
        await r.aclose()


async def test_the_recorder_stores_a_drops_moments(clean_backends, db) -> None:
    await _record_a_drop(clean_backends.redis_url, clean_backends.database_url, db)


async def test_the_recorder_stores_a_drops_moments_on_a_redis_cluster(
        cluster_backends, db) -> None:
    """On a cluster a drop's events go out with SPUBLISH on its shard: the recorder
    must listen there with SSUBSCRIBE (it SUBSCRIBEd, and stored nothing)."""
    await _record_a_drop(cluster_backends.redis_url, cluster_backends.database_url, db)


@only_single_redis  # CLIENT KILL of the one Redis's subscriber connection
async def test_moments_published_while_the_subscription_was_down_are_stored_once(
        clean_backends, db) -> None:
    """The recorder's subscription is lost and held back from reconnecting while the
    drop publishes: once it is back, those moments are read from the drop's history
    and stored once each, beside the ones heard live before and after."""
    from tests.test_private_recovery import Gate

    drop_id, (pid,) = await create_drop(clean_backends.database_url)
    r = connect(clean_backends.redis_url)
    clock = {"ms": 1000}
    recorder = MomentRecorder(r, db, drop_id, media_ms=lambda: clock["ms"],
                              redis_url=clean_backends.redis_url)
    await recorder.start()
    try:
        await publish(r, drop_id, "drop.pinned", {"product_id": pid})
        assert await _kinds(db, drop_id, 1) == [("pinned", pid, 1000)]
        gate = Gate()
        subscriber = recorder._subscriber
        gate.hold(subscriber, "_connect")
        assert await r.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        deadline = time.monotonic() + 5
        while subscriber._conn is not None:
            assert time.monotonic() < deadline, "the subscription was not lost"
            await asyncio.sleep(0.02)
        clock["ms"] = 2000
        await publish_many(r, drop_id, [("drop.state", {"state": "on_sale"}),
                                        ("drop.buy_now", {"product_id": pid})])
        await publish(r, drop_id, "drop.sold_out", {"product_id": pid})
        await asyncio.sleep(0.3)
        clock["ms"] = 3000  # the gap is filled now: when it was read
        gate.open.set()
        assert await _kinds(db, drop_id, 3) == [
            ("pinned", pid, 1000), ("buy_now", pid, 3000), ("sold_out", pid, 3000)]
        await publish(r, drop_id, "drop.closed", {})
        assert await _kinds(db, drop_id, 4) == [
            ("pinned", pid, 1000), ("buy_now", pid, 3000), ("sold_out", pid, 3000),
            ("closed", None, 3000)]
    finally:
        await recorder.stop()
        await r.aclose()
