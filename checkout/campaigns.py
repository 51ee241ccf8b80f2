"""Campaign drops (group buy, seeds 000 and 001): authorize now, capture at the deadline.

A campaign drop has a goal (minimum orders) and a deadline. Each backer's card is
authorized with ``capture_method=manual`` (the order worker does this for every order
of a ``kind = 'campaign'`` drop); at the deadline the :class:`DeadlineLoop` captures
every authorization if the goal is met and cancels every one otherwise. Progress
(backers, goal, percent) goes out as the volatile ``campaign.progress`` event after
each authorization; the outcome as the durable ``campaign.ended`` event.

Authorizations lapse: Stripe cancels an uncaptured PaymentIntent 7 days after it was
created, 5 days for some Visa merchant-initiated payments
(https://docs.stripe.com/payments/place-a-hold-on-a-payment-method). Decision: we
*refuse* campaigns whose deadline is more than :data:`MAX_CAMPAIGN_SECONDS` (5 days)
away -- the shortest window, so every authorization taken during the campaign can
still be captured at its deadline -- rather than saving cards and charging later
(which needs off-session charges that can fail or require authentication long after
the buyer left). :func:`check_deadline` is the rule (:mod:`checkout.campaign_rules`,
re-exported here); the order worker also refuses to authorize an order whose capture
would fall outside the window.

Dependencies point one way: this module drives :class:`checkout.orders.OrderProcessor`;
the order pipeline never imports it (it reads the rule from ``campaign_rules``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import Counter

from checkout.campaign_rules import MAX_CAMPAIGN_SECONDS, CampaignTooLong, check_deadline
from checkout.order_rows import order_columns
from checkout.orders import OrderProcessor
from checkout.payments import Gateway, GatewayError
from dropserver.background import Periodic

__all__ = ["MAX_CAMPAIGN_SECONDS", "CampaignTooLong", "DeadlineLoop", "broadcast_progress",
           "check_deadline", "finish_campaign", "progress", "run_due"]

log = logging.getLogger("dropserver.campaigns")

CAMPAIGNS_FINISHED = Counter("dropserver_campaigns_finished_total",
                             "Campaign drops finished at their deadline", ["outcome"])


def progress(backers: int, goal: int) -> dict[str, int]:
    """The ``campaign.progress`` payload (percent may pass 100 when over-funded)."""
    return {"backers": backers, "goal": goal, "percent": backers * 100 // max(goal, 1)}


async def _counts(db: Any, drop_id: int) -> tuple[int, int]:
    row = await db.fetchrow(
        """SELECT d.campaign_goal_orders AS goal,
                  (SELECT count(*) FROM campaign_backers b WHERE b.drop_id = d.id
                     AND b.state IN ('authorized', 'captured')) AS backers
           FROM drops d WHERE d.id = $1""", drop_id)
    return int(row["backers"]), int(row["goal"] or 0)


async def broadcast_progress(db: Any, redis: Any, drop_id: int) -> dict[str, int]:
    from realtime.publish import publish_volatile

    backers, goal = await _counts(db, drop_id)
    data = progress(backers, goal)
    await publish_volatile(redis, drop_id, "campaign.progress", data)
    return data


async def finish_campaign(db: asyncpg.Pool, redis: Any, gateway: Gateway,
                          processor: OrderProcessor, drop_id: int) -> str:
    """Capture all (goal met) or cancel all (not met); record and announce the outcome.
    Idempotent: capture/cancel use fixed keys and already-finished backers are skipped."""
    backers, goal = await _counts(db, drop_id)
    met = backers >= goal
    rows = await db.fetch(
        f"""SELECT {order_columns("o")}, p.intent_id FROM campaign_backers b
            JOIN orders o ON o.id = b.order_id JOIN payments p ON p.order_id = o.id
            WHERE b.drop_id = $1 AND b.state = 'authorized' ORDER BY o.id""", drop_id)
    sem = asyncio.Semaphore(16)

    async def one(row: asyncpg.Record) -> None:
        hold = row["public_id"]
        async with sem:
            try:
                if met:
                    intent = await gateway.capture_intent(
                        row["intent_id"], idempotency_key=f"capture:{hold}")
                else:
                    intent = await gateway.cancel_intent(
                        row["intent_id"], idempotency_key=f"cancel:{hold}")
            except GatewayError as exc:
                if exc.retryable:
                    raise
                # e.g. the authorization lapsed: read what it is now
                intent = await gateway.retrieve_intent(row["intent_id"])
            await processor.apply_intent(row, intent)
            state = {"succeeded": "captured", "canceled": "cancelled"}.get(
                intent.status.value, "failed")
            await db.execute("UPDATE campaign_backers SET state = $2 WHERE order_id = $1",
                             row["id"], state)

    await asyncio.gather(*(one(r) for r in rows))
    outcome = "succeeded" if met else "failed"
    changed = await db.fetchval(
        "UPDATE drops SET campaign_outcome = $2, updated_at = now() WHERE id = $1 "
        "AND campaign_outcome IS DISTINCT FROM $2 RETURNING id", drop_id, outcome)
    if changed is not None:
        CAMPAIGNS_FINISHED.labels(outcome).inc()
        from realtime.publish import publish

        await publish(redis, drop_id, "campaign.ended",
                      {"outcome": outcome, **progress(backers, goal)})
        log.info("campaign finished", extra={"drop_id": drop_id, "outcome": outcome,
                                             "backers": backers, "goal": goal})
    return outcome


async def run_due(db: asyncpg.Pool, redis: Any, gateway: Gateway,
                  processor: OrderProcessor, now: datetime | None = None) -> list[int]:
    """Finish every campaign whose deadline has passed; returns their drop ids."""
    now = now or datetime.now(UTC)
    ids = [r["id"] for r in await db.fetch(
        """SELECT id FROM drops WHERE kind = 'campaign' AND campaign_deadline <= $1
           AND COALESCE(campaign_outcome, 'pending') = 'pending' ORDER BY id""", now)]
    for drop_id in ids:
        await finish_campaign(db, redis, gateway, processor, drop_id)
    return ids


class DeadlineLoop:
    """Runs :func:`run_due` every ``interval`` seconds in the background."""

    def __init__(self, db: asyncpg.Pool, redis: Any, gateway: Gateway,
                 processor: OrderProcessor, interval: float) -> None:
        self.args = (db, redis, gateway, processor)
        self._loop = Periodic("campaign-deadlines", interval, self.run_due, log,
                              "campaign deadline check", level=logging.ERROR)
        self.start, self.stop = self._loop.start, self._loop.stop

    async def run_due(self) -> list[int]:
        return await run_due(*self.args)
