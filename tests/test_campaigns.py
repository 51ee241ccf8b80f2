"""checkout/campaigns.py: manual-capture campaigns on the real app, the real stripe SDK
and the loopback stub; the deadline loop captures all or cancels all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from checkout.campaigns import CampaignTooLong, check_deadline, progress
from checkout.dead_letters import DEAD_LETTER_STREAM
from dropserver.redis_client import connect as connect_redis
from realtime import channels
from tests import payments_fixtures as pf
from tests.payments_fixtures import add_reserve, make_drop, order_row, save_card, wait_for
from tests.pubsub_support import listen

stub = pf.stub
stripe_server = pf.stripe_server
client = pf.client


def test_deadline_rule() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    check_deadline(now + timedelta(days=4, hours=23), now)
    with pytest.raises(CampaignTooLong):
        check_deadline(now + timedelta(days=5, seconds=1), now)
    with pytest.raises(ValueError):
        check_deadline(now - timedelta(seconds=1), now)


def test_progress_payload() -> None:
    assert progress(3, 4) == {"backers": 3, "goal": 4, "percent": 75}
    assert progress(6, 4)["percent"] == 150
    assert progress(0, 10)["percent"] == 0


async def _backers(db, drop_id: int) -> list[str]:
    return [r["state"] for r in await db.fetch(
        "SELECT state FROM campaign_backers WHERE drop_id = $1 ORDER BY order_id", drop_id)]


async def test_goal_met_captures_everyone(settings, stripe_server, stub, client) -> None:
    db = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    pubsub = None
    try:
        drop_id, product_id = await make_drop(db, kind="campaign", goal=2, deadline_s=2.5)
        pubsub = await listen(redis, channels.drop_channel(drop_id))
        holds = []
        for buyer in ("cb-1", "cb-2"):
            await save_card(db, buyer)
            holds.append(await add_reserve(redis, drop_id, product_id, buyer,
                                           flow="off_session"))
        for hold in holds:
            await pf.wait_state(db, hold, "authorized")
            pi = stub.intents[(await order_row(db, hold))["intent_id"]]
            assert pi["capture_method"] == "manual" and pi["status"] == "requires_capture"
        assert await _backers(db, drop_id) == ["authorized", "authorized"]

        async def progress_seen():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            return msg if msg and b"campaign.progress" in msg["data"] else None
        await wait_for(progress_seen)

        async def finished():
            return await db.fetchval("SELECT campaign_outcome FROM drops WHERE id = $1",
                                     drop_id) == "succeeded"
        await wait_for(finished, 15)
        for hold in holds:
            row = await order_row(db, hold)
            assert row["state"] == "paid" and row["amount_received"] == 2500
            assert stub.intents[row["intent_id"]]["status"] == "succeeded"
        assert await _backers(db, drop_id) == ["captured", "captured"]
        assert stub.idempotency_keys.count(f"capture:{holds[0]}") == 1
    finally:
        if pubsub is not None:
            await pubsub.aclose()
        await redis.aclose()
        await db.close()


async def test_goal_missed_cancels_everyone(settings, stripe_server, stub, client) -> None:
    db = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    try:
        drop_id, product_id = await make_drop(db, kind="campaign", goal=3, deadline_s=2.0)
        await save_card(db, "cm-1")
        hold = await add_reserve(redis, drop_id, product_id, "cm-1", flow="off_session")
        await pf.wait_state(db, hold, "authorized")

        async def finished():
            return await db.fetchval("SELECT campaign_outcome FROM drops WHERE id = $1",
                                     drop_id) == "failed"
        await wait_for(finished, 15)
        row = await order_row(db, hold)
        assert row["state"] == "cancelled"
        assert stub.intents[row["intent_id"]]["status"] == "canceled"
        assert await _backers(db, drop_id) == ["cancelled"]
    finally:
        await redis.aclose()
        await db.close()


async def test_campaign_longer_than_the_authorization_window_is_refused(
        settings, stripe_server, stub, client) -> None:
    db = await asyncpg.connect(settings.database_url)
    redis = connect_redis(settings.redis_url)
    try:
        drop_id, product_id = await make_drop(db, kind="campaign", goal=1,
                                              deadline_s=6 * 24 * 3600)
        await save_card(db, "cl-1")
        before = stub.count("POST /v1/payment_intents")
        hold = await add_reserve(redis, drop_id, product_id, "cl-1", flow="off_session")
        await pf.wait_state(db, hold, "failed")
        assert stub.count("POST /v1/payment_intents") == before
        dead = await redis.xrange(DEAD_LETTER_STREAM)
        assert any(b"5 days" in f[b"error"] for _, f in dead)
    finally:
        await redis.aclose()
        await db.close()
