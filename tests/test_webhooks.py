"""POST /v1/webhooks/stripe on the real app: signatures, duplicates, out-of-order
events, refunds and disputes. The app's own order worker and the real stripe SDK talk
to the loopback Stripe stub."""

from __future__ import annotations

import json
import time

import asyncpg

from tests import payments_fixtures as pf
from tests.payments_fixtures import add_reserve, make_drop, order_row, wait_state
from tests.stripe_stub import sign_payload

# fixtures shared with the other payments tests
stub = pf.stub
stripe_server = pf.stripe_server
client = pf.client

URL = "/v1/webhooks/stripe"


async def _db(settings) -> asyncpg.Connection:
    return await asyncpg.connect(settings.database_url)


async def _paid_by_buyer(stripe_server, stub, db) -> tuple[str, str]:
    """A client-confirmed order whose buyer confirmed in 'Stripe.js'."""
    app = stripe_server.app
    drop_id, product_id = await make_drop(db)
    hold = await add_reserve(app.state.redis, drop_id, product_id, "buyer-w")
    row = await wait_state(db, hold, "payment_pending")
    stub.confirm_as_buyer(row["intent_id"], "pm_card_visa")
    return hold, row["intent_id"]


async def test_succeeded_event_pays_and_replay_is_a_no_op(settings, stripe_server, stub,
                                                          client) -> None:
    db = await _db(settings)
    try:
        hold, pi = await _paid_by_buyer(stripe_server, stub, db)
        event = stub.event_for("payment_intent.succeeded", pi)
        first = await stub.deliver(stripe_server.base_url + URL, event)
        assert first.status_code == 200 and first.json()["result"] == "processed"
        row = await order_row(db, hold)
        assert row["state"] == "paid" and row["payment_status"] == "succeeded"
        assert row["amount_received"] == 2500 and row["fee"] > 0
        updated = await db.fetchval("SELECT updated_at FROM orders WHERE public_id = $1",
                                    hold)
        again = await stub.deliver(stripe_server.base_url + URL, event)
        assert again.status_code == 200 and again.json()["result"] == "duplicate"
        assert await db.fetchval("SELECT count(*) FROM webhook_events") == 1
        assert await db.fetchval("SELECT updated_at FROM orders WHERE public_id = $1",
                                 hold) == updated
    finally:
        await db.close()


async def test_forged_signatures_are_refused(settings, stripe_server, stub, client) -> None:
    db = await _db(settings)
    try:
        _, pi = await _paid_by_buyer(stripe_server, stub, db)
        event = stub.event_for("payment_intent.succeeded", pi)
        # signed with another secret
        bad = await stub.deliver(stripe_server.base_url + URL, event, secret="whsec_evil")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "signature_invalid"
        # a valid signature of different bytes
        payload = json.dumps(event).encode()
        header = sign_payload(payload, stub.webhook_secret)
        tampered = payload.replace(b'"succeeded"', b'"canceled"', 1)
        r = await client.post(URL, content=tampered, headers={"Stripe-Signature": header})
        assert r.status_code == 400 and r.json()["error"]["code"] == "signature_invalid"
        # a replay of an old delivery (outside the 300 s tolerance)
        old = await stub.deliver(stripe_server.base_url + URL, event,
                                 timestamp=int(time.time()) - 3600)
        assert old.status_code == 400
        # no header at all, and garbage
        r = await client.post(URL, content=payload)
        assert r.status_code == 400 and r.json()["error"]["code"] == "signature_invalid"
        junk = b"not json"
        r = await client.post(URL, content=junk, headers={
            "Stripe-Signature": sign_payload(junk, stub.webhook_secret)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_event"
        assert await db.fetchval("SELECT count(*) FROM webhook_events") == 0
    finally:
        await db.close()


async def test_stale_snapshot_does_not_override_current_state(settings, stripe_server, stub,
                                                              client) -> None:
    """A payment_failed event (an earlier card) arriving after the success: the
    intent is re-read, and it has succeeded, so the order stays paid."""
    db = await _db(settings)
    try:
        hold, pi = await _paid_by_buyer(stripe_server, stub, db)
        stale = stub.event_for("payment_intent.payment_failed", pi)
        stale["data"]["object"]["status"] = "requires_payment_method"
        stale["data"]["object"]["last_payment_error"] = {"code": "card_declined"}
        ok = stub.event_for("payment_intent.succeeded", pi)
        url = stripe_server.base_url + URL
        assert (await stub.deliver(url, ok)).status_code == 200
        assert (await stub.deliver(url, stale)).status_code == 200
        assert (await order_row(db, hold))["state"] == "paid"
    finally:
        await db.close()


async def test_refund_and_dispute_events(settings, stripe_server, stub, client) -> None:
    db = await _db(settings)
    url = stripe_server.base_url + URL
    try:
        app = stripe_server.app
        hold, pi = await _paid_by_buyer(stripe_server, stub, db)
        await stub.deliver(url, stub.event_for("payment_intent.succeeded", pi))
        await app.state.payments_gateway.refund(pi, idempotency_key=f"refund:{hold}")
        charge = stub.intents[pi]["latest_charge"]
        r = await stub.deliver(url, stub.event_for("charge.refunded", charge))
        assert r.json()["result"] == "processed"
        row = await order_row(db, hold)
        assert row["state"] == "refunded"
        assert await db.fetchval("SELECT amount_refunded FROM payments WHERE intent_id = $1",
                                 pi) == 2500

        hold2, pi2 = await _paid_by_buyer(stripe_server, stub, db)
        await stub.deliver(url, stub.event_for("payment_intent.succeeded", pi2))
        dispute = stub.open_dispute(pi2)
        await stub.deliver(url, stub.event_for("charge.dispute.created", dispute["id"]))
        assert (await order_row(db, hold2))["state"] == "disputed"
        stub.close_dispute(dispute["id"], "won")
        await stub.deliver(url, stub.event_for("charge.dispute.closed", dispute["id"]))
        assert (await order_row(db, hold2))["state"] == "paid"
    finally:
        await db.close()


async def test_canceled_event_and_unknown_objects(settings, stripe_server, stub,
                                                  client) -> None:
    db = await _db(settings)
    url = stripe_server.base_url + URL
    try:
        app = stripe_server.app
        drop_id, product_id = await make_drop(db)
        hold = await add_reserve(app.state.redis, drop_id, product_id, "buyer-c")
        row = await wait_state(db, hold, "payment_pending")
        await app.state.payments_gateway.cancel_intent(row["intent_id"],
                                                       idempotency_key="cancel:test")
        r = await stub.deliver(url, stub.event_for("payment_intent.canceled",
                                                   row["intent_id"]))
        assert r.json()["result"] == "processed"
        assert (await order_row(db, hold))["state"] == "cancelled"
        other = stub.make_event("payment_intent.succeeded", {"id": "pi_nobody"})
        assert (await stub.deliver(url, other)).json()["result"] == "ignored"
        unknown = stub.make_event("customer.created", {"id": "cus_1"})
        assert (await stub.deliver(url, unknown)).json()["result"] == "ignored"
    finally:
        await db.close()


async def test_webhook_secret_missing_is_503(http) -> None:
    r = await http.post(URL, content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_configured"
