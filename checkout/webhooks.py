"""Stripe webhooks: verify, deduplicate, re-read, apply.

Following https://docs.stripe.com/webhooks:

* the signature (``Stripe-Signature: t=...,v1=...``, HMAC-SHA256 of ``"t.raw_body"``) is
  checked by the stripe library on the raw bytes, with its 300 s tolerance;
* delivery is at least once and in any order, so the event id goes into
  ``webhook_events`` first (``ON CONFLICT DO NOTHING``): a duplicate of a processed event
  is a no-op, and the event's snapshot is never trusted -- the PaymentIntent, Charge or
  Dispute is fetched again and its *current* state applied;
* an event that fails to apply answers 500 and stays unprocessed, so Stripe's retry
  processes it again.

Handled: ``payment_intent.succeeded``, ``.payment_failed``, ``.canceled``,
``.amount_capturable_updated``, ``.processing``; ``charge.refunded`` and
``refund.*``; ``charge.dispute.*``. Anything else is stored and acknowledged.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

import asyncpg
import stripe
from prometheus_client import Counter

from checkout.order_rows import order_columns
from checkout.order_states import OrderState
from checkout.orders import OrderProcessor
from checkout.payments import Gateway
from checkout.tips import Tips

__all__ = ["WebhookError", "WebhookResult", "handle_event", "verify"]

log = logging.getLogger("dropserver.webhooks")

WEBHOOKS = Counter("dropserver_webhooks_total", "Stripe webhook deliveries",
                   ["type", "result"])


class WebhookResult(enum.StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


class WebhookError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def verify(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event as a dict, or :class:`WebhookError` (``signature_invalid``,
    ``malformed_event``, ``not_configured``)."""
    if not secret:
        raise WebhookError("not_configured", "STRIPE_WEBHOOK_SECRET is not set")
    try:
        event = stripe.Webhook.construct_event(payload, signature or "", secret)
    except stripe.SignatureVerificationError as exc:
        raise WebhookError("signature_invalid", str(exc)) from None
    except ValueError as exc:
        raise WebhookError("malformed_event", f"not a JSON event: {exc}") from None
    data = event.to_dict()
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise WebhookError("malformed_event", "an event needs an id and a type")
    return data


def _object_id(event: dict[str, Any]) -> str | None:
    obj = (event.get("data") or {}).get("object") or {}
    oid = obj.get("id")
    return oid if isinstance(oid, str) else None


async def _order_for_intent(db: asyncpg.Pool, intent_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(
        f"SELECT {order_columns('o')} FROM orders o JOIN payments p ON p.order_id = o.id "
        "WHERE p.intent_id = $1", intent_id)


async def handle_event(event: dict[str, Any], *, db: asyncpg.Pool, gateway: Gateway,
                       processor: OrderProcessor, tips: Tips | None = None) -> WebhookResult:
    """Record and apply one verified event (idempotent). An intent or charge that is no
    order's may be a tip's (``tips``)."""
    etype = event["type"]
    row = await db.fetchrow(
        """INSERT INTO webhook_events (id, type, object_id, payload)
           VALUES ($1, $2, $3, $4::jsonb)
           ON CONFLICT (id) DO UPDATE SET type = EXCLUDED.type
           RETURNING processed_at""",
        event["id"], etype, _object_id(event), json.dumps(event))
    if row["processed_at"] is not None:
        WEBHOOKS.labels(etype, "duplicate").inc()
        return WebhookResult.DUPLICATE
    result = await _apply(event, db=db, gateway=gateway, processor=processor, tips=tips)
    await db.execute("UPDATE webhook_events SET processed_at = now() WHERE id = $1",
                     event["id"])
    WEBHOOKS.labels(etype, result.value).inc()
    return result


async def _apply(event: dict[str, Any], *, db: asyncpg.Pool, gateway: Gateway,
                 processor: OrderProcessor, tips: Tips | None) -> WebhookResult:
    etype: str = event["type"]
    oid = _object_id(event)
    if oid is None:
        return WebhookResult.IGNORED
    if etype.startswith("payment_intent."):
        order = await _order_for_intent(db, oid)
        if order is None and tips is not None and await tips.apply_intent_id(oid):
            return WebhookResult.PROCESSED
        if order is None:
            log.info("webhook for an unknown intent", extra={"intent_id": oid})
            return WebhookResult.IGNORED
        intent = await gateway.retrieve_intent(oid)  # the current state, not the snapshot
        await processor.apply_intent(order, intent)
        return WebhookResult.PROCESSED
    if etype == "charge.refunded" or etype.startswith("refund."):
        obj = event["data"]["object"]
        charge_id = oid if etype.startswith("charge.") else obj.get("charge")
        if not isinstance(charge_id, str):
            return WebhookResult.IGNORED
        charge = await gateway.retrieve_charge(charge_id)
        if not charge.payment_intent:
            return WebhookResult.IGNORED
        order = await _order_for_intent(db, charge.payment_intent)
        if order is None:
            tip = tips is not None and await tips.record_refund_for_intent(
                charge.payment_intent, charge.amount_refunded, full=charge.refunded)
            return WebhookResult.PROCESSED if tip else WebhookResult.IGNORED
        await processor.record_refund(order, charge.amount_refunded, full=charge.refunded)
        return WebhookResult.PROCESSED
    if etype.startswith("charge.dispute."):
        dispute = await gateway.retrieve_dispute(oid)
        intent_id = dispute.payment_intent
        if not intent_id and dispute.charge:
            intent_id = (await gateway.retrieve_charge(dispute.charge)).payment_intent
        order = await _order_for_intent(db, intent_id) if intent_id else None
        if order is None:
            return WebhookResult.IGNORED
        if dispute.status == "lost":
            # the money went back to the cardholder: like a full refund
            await processor.record_refund(order, dispute.amount, full=True)
        elif dispute.status == "won":
            await processor.move(order, OrderState.PAID)
            await processor.tell(order)
        else:
            await processor.move(order, OrderState.DISPUTED)
        return WebhookResult.PROCESSED
    return WebhookResult.IGNORED

