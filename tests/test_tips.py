"""Tips during the live (checkout/tips.py, tips_api.py): a real PaymentIntent through
the payments pipeline (the fake gateway held to Stripe's rules), the room's ``tip``
event once paid, the ``tip.paid`` webhook once, refunds recorded, the sweep repairing a
lost webhook or a crash between the charge and its row, and tips in the settlement
with the platform fee rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from drops.settlement import Sale, Split, settle
from dropserver.auth import Role
from tests.invariants import fake_gateway_payments
from tests.realtime_support import Client

CREATOR = "creator-tips"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, Role.CREATOR))


async def live_drop(http, creator, *, amounts=(200, 500, 1000)) -> int:
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "Tip night", "products": [{"title": "Cap", "price": 2500, "units": 5}]})
    assert resp.status_code == 201, resp.text
    drop_id = resp.json()["id"]
    if amounts is not None:
        resp = await http.post(f"/v1/drops/{drop_id}/tip-amounts", headers=creator,
                               json={"amounts": list(amounts)})
        assert resp.status_code == 200, resp.text
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    for action, payload in (("schedule", {"starts_at": starts}), ("live", {})):
        resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=payload,
                               headers=creator)
        assert resp.status_code == 200, resp.text
    return drop_id


async def tip(http, token, drop_id, amount=500, message="great show", key="t1"):
    return await http.post(f"/v1/drops/{drop_id}/tips", headers=bearer(token), json={
        "amount": amount, "message": message, "idempotency_key": key})


async def confirm(http, token, tip_id, pm="pm_card_visa"):
    return await http.post(f"/v1/dev/tips/{tip_id}/confirm", headers=bearer(token),
                           json={"payment_method": pm})


async def tip_money_agrees(db, redis) -> None:
    """The gateway and PostgreSQL agree on every tip: one intent each, the money the
    gateway keeps is what the tip rows say (received less refunded), and it is kept
    only for paid tips."""
    rows = {r["intent_id"]: r for r in await db.fetch(
        "SELECT intent_id, state, amount, amount_received, amount_refunded FROM tips "
        "WHERE intent_id IS NOT NULL")}
    assert await db.fetchval("SELECT count(*) FROM tips WHERE intent_id IS NULL "
                             "AND payment_requested") == 0
    gateway = {p.intent_id: p for p in await fake_gateway_payments(redis)}
    for intent_id, row in rows.items():
        p = gateway[intent_id]
        assert (p.received, p.refunded) == (row["amount_received"], row["amount_refunded"])
        assert (p.kept > 0) == (row["state"] == "paid"), (row, p)
        if row["state"] == "paid":
            assert p.kept == row["amount"]


def test_tips_take_the_platform_fee_and_go_to_the_creator():
    split = Split(platform_fee_bps=1000)
    s = settle([Sale(1, 10000, payment_fee=320, cogs=4000)], split, {"inv": 1},
               tips=[Sale(11, 1000, payment_fee=59), Sale(12, 500, refunded=500,
                                                          payment_fee=45)])
    assert (s.tips_gross, s.tips_refunds, s.tips_platform_fee) == (1500, 500, 100)
    assert s.tips_creator == 900 and s.tips_payment_fees == 104
    # the sale's own waterfall is untouched; investors get none of the tips
    assert (s.gross, s.platform_fee, s.profit) == (10000, 1000, 5000)
    assert s.investors == {"inv": 2500}
    assert s.creator_payout == 4000 + 1250 + 900
    assert s.platform_total == (1000 - 320) + 1250 + 100 - 104
    kept = s.tips_gross - s.tips_refunds - s.tips_payment_fees
    assert s.tips_creator + (s.tips_platform_fee - s.tips_payment_fees) == kept


async def test_a_tip_is_paid_announced_and_sent_as_a_webhook_once(server, http, creator,
                                                                  make_token):
    drop_id = await live_drop(http, creator)
    fan = make_token("fan-1", Role.VIEWER, name="Ada")
    watcher = await Client.connect(server.ws_url, token=make_token("w", Role.VIEWER))
    assert (await watcher.join(drop_id))["t"] == "joined"
    resp = await tip(http, fan, drop_id)
    assert resp.status_code == 201, resp.text
    sent = resp.json()
    assert sent["state"] == "payment_pending" and sent["client_secret"]
    assert sent["amount"] == 500 and sent["message"] == "great show"
    again = await tip(http, fan, drop_id)  # a retry: the same tip, the same intent
    assert again.json()["tip_id"] == sent["tip_id"]
    assert again.json()["intent_id"] == sent["intent_id"]
    other = await tip(http, fan, drop_id, amount=1000)
    assert other.status_code == 409 and other.json()["error"]["code"] == \
        "idempotency_mismatch"
    declined = await confirm(http, fan, sent["tip_id"], "pm_card_chargeDeclined")
    assert declined.json()["state"] == "payment_pending"
    assert declined.json()["error"] == "card_declined"
    paid = await confirm(http, fan, sent["tip_id"])
    assert paid.status_code == 200 and paid.json()["state"] == "paid"
    frame = await watcher.recv_until(lambda f: f.get("event") == "tip", wait=5)
    assert frame["data"] == {"tip_id": sent["tip_id"], "user_id": "fan-1", "name": "Ada",
                             "amount": 500, "currency": "usd", "message": "great show"}
    await watcher.close()
    db = server.app.state.db
    # the confirm and the gateway's webhook both applied it: one event, one intent
    hooks = await db.fetch("SELECT body FROM outbound_events WHERE type = 'tip.paid'")
    assert len(hooks) == 1 and sent["tip_id"] in hooks[0]["body"]
    row = await db.fetchrow("SELECT state, amount_received, announced FROM tips")
    assert dict(row) == {"state": "paid", "amount_received": 500, "announced": True}
    listing = (await http.get(f"/v1/drops/{drop_id}/tips", headers=creator)).json()
    assert listing["amounts"] == [200, 500, 1000]
    assert [t["tip_id"] for t in listing["recent"]] == [sent["tip_id"]]
    assert listing["totals"] == {"count": 1, "gross": 500, "refunded": 0, "net": 500,
                                 "pending": 0, "top": [{"user_id": "fan-1", "name": "Ada",
                                                        "amount": 500}]}
    public = (await http.get(f"/v1/drops/{drop_id}/tips")).json()
    assert "totals" not in public and "user_id" not in public["recent"][0]


async def test_tips_refuse_what_the_creator_did_not_offer(server, http, creator,
                                                          make_token):
    fan = make_token("fan-1", Role.VIEWER)
    drop_id = await live_drop(http, creator, amounts=None)
    resp = await tip(http, fan, drop_id)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "tips_off"
    await http.post(f"/v1/drops/{drop_id}/tip-amounts", headers=creator,
                    json={"amounts": [300]})
    resp = await tip(http, fan, drop_id, amount=500)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "tip_amount_not_offered"
    for body, fld in (({"amounts": [0]}, "amounts[0]"), ({"amounts": [5, 5]}, "amounts"),
                      ({"amounts": ["5"]}, "amounts[0]"),
                      ({"amounts": [1, 2, 3, 4, 5, 6, 7]}, "amounts")):
        resp = await http.post(f"/v1/drops/{drop_id}/tip-amounts", headers=creator,
                               json=body)
        assert resp.status_code == 422 and resp.json()["error"]["details"]["field"] == fld
    resp = await http.post(f"/v1/drops/{drop_id}/tip-amounts", json={"amounts": [1]},
                           headers=bearer(make_token("someone", Role.CREATOR)))
    assert resp.status_code == 403
    resp = await http.post(f"/v1/drops/{drop_id}/tips", json={"amount": 300})
    assert resp.status_code == 401
    resp = await tip(http, fan, drop_id, amount=300, message="x" * 201)
    assert resp.status_code == 422
    db = server.app.state.db
    await db.execute("INSERT INTO chat_moderation (drop_id, user_id, action, moderator_id) "
                     "VALUES ($1, 'fan-1', 'mute', $2)", drop_id, CREATOR)
    resp = await tip(http, fan, drop_id, amount=300, key="muted")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "muted"
    resp = await tip(http, fan, drop_id, amount=300, message="", key="muted-2")
    assert resp.status_code == 201  # a muted viewer may still tip, without a message
    await db.execute("INSERT INTO chat_moderation (drop_id, user_id, action, moderator_id) "
                     "VALUES ($1, 'fan-1', 'ban', $2)", drop_id, CREATOR)
    resp = await tip(http, fan, drop_id, amount=300, message="", key="banned")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "banned"
    await http.post(f"/v1/drops/{drop_id}/end", headers=creator, json={})
    resp = await tip(http, fan, drop_id, amount=300, key="late")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "drop_not_on_air"
    assert await db.fetchval("SELECT count(*) FROM tips") == 1  # the muted one's


async def test_refunds_are_recorded_and_tips_are_settled(server, http, creator,
                                                         make_token):
    drop_id = await live_drop(http, creator)
    db = server.app.state.db
    ids = []
    for n, (user, amount) in enumerate((("fan-1", 1000), ("fan-2", 500))):
        token = make_token(user, Role.VIEWER)
        resp = await tip(http, token, drop_id, amount=amount, key=f"k{n}")
        ids.append(resp.json()["tip_id"])
        assert (await confirm(http, token, ids[-1])).json()["state"] == "paid"
    resp = await http.post(f"/v1/tips/{ids[1]}/refund", headers=creator, json={})
    assert resp.status_code == 200 and resp.json()["state"] == "refunded"
    assert resp.json()["amount_refunded"] == 500
    resp = await http.post(f"/v1/tips/{ids[1]}/refund", headers=creator, json={})
    assert resp.status_code == 200  # again: the same answer, no second refund
    stranger = bearer(make_token("fan-3", Role.VIEWER))
    assert (await http.get(f"/v1/tips/{ids[0]}", headers=stranger)).status_code == 404
    assert (await http.get(f"/v1/tips/{ids[0]}",
                           headers=bearer(make_token("fan-1", Role.VIEWER)))).json()[
        "state"] == "paid"
    await http.post(f"/v1/drops/{drop_id}/end", headers=creator, json={})
    await db.execute("UPDATE creators SET stripe_account_id = 'acct_cleo' "
                     "WHERE user_id = $1", CREATOR)
    resp = await http.post(f"/v1/drops/{drop_id}/settle", headers=creator, json={})
    assert resp.status_code == 200, resp.text
    tips = resp.json()["totals"]["tips"]
    assert tips["gross"] == 1500 and tips["refunds"] == 500
    assert tips["platform_fee"] == 100 and tips["creator"] == 900
    ledger = {(r["account"], r["party_id"]): r["amount"] for r in resp.json()["ledger"]}
    assert ledger[("tips", None)] == 1500 and ledger[("tips_creator", CREATOR)] == 900
    payout = next(p for p in resp.json()["payouts"] if p["role"] == "creator")
    assert payout["amount"] == resp.json()["totals"]["creator_payout"] == 900
    assert payout["state"] == "sent"
    # the transfer is an outbound webhook, once, whatever settles again
    await http.post(f"/v1/drops/{drop_id}/settle", headers=creator, json={})
    [sent] = await db.fetch("SELECT body FROM outbound_events WHERE type = 'payout.sent'")
    data = json.loads(sent["body"])["data"]
    assert data == {"drop_id": drop_id, "party_id": CREATOR, "role": "creator",
                    "amount": 900, "currency": "usd", "transfer_id": payout["transfer_id"],
                    "transfer_group": f"drop_{drop_id}"}
    # refunded after settlement: the ledger is reversed
    resp = await http.post(f"/v1/tips/{ids[0]}/refund", headers=creator, json={})
    assert resp.json()["state"] == "refunded"
    total = await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE drop_id = $1 "
                              "AND account = 'tips_creator'", drop_id)
    assert total == 0
    await tip_money_agrees(db, server.app.state.redis)


async def test_the_sweep_repairs_a_lost_webhook_and_a_crash_before_the_row(server, http,
                                                                          creator,
                                                                          make_token):
    app = server.app
    db, gateway, tips = app.state.db, app.state.payments_gateway, app.state.tips
    drop_id = await live_drop(http, creator)
    fan = make_token("fan-1", Role.VIEWER)
    watcher = await Client.connect(server.ws_url, token=make_token("w", Role.VIEWER))
    await watcher.join(drop_id)
    # 1. the card is confirmed but neither the confirm's answer nor the webhook is seen
    sent = (await tip(http, fan, drop_id)).json()
    listeners, gateway.listeners[:] = list(gateway.listeners), []
    try:
        await gateway.confirm_as_buyer(sent["intent_id"], "pm_card_visa")
    finally:
        gateway.listeners[:] = listeners
    # 2. a crash after the gateway made the intent, before the tip's row knew it
    second = (await tip(http, fan, drop_id, amount=200, key="t2")).json()
    await db.execute("UPDATE tips SET intent_id = NULL WHERE public_id = $1",
                     second["tip_id"])
    await db.execute("UPDATE tips SET updated_at = now() - interval '1 minute'")
    assert await db.fetchval("SELECT count(*) FROM tips WHERE state = 'paid'") == 0
    done = await tips.sweep()
    assert done["reread"] == 2
    rows = {r["public_id"]: r for r in await db.fetch(
        "SELECT public_id, state, intent_id, announced FROM tips")}
    assert rows[sent["tip_id"]]["state"] == "paid" and rows[sent["tip_id"]]["announced"]
    assert rows[second["tip_id"]]["intent_id"] == second["intent_id"]  # the same intent
    frame = await watcher.recv_until(lambda f: f.get("event") == "tip", wait=5)
    assert frame["data"]["tip_id"] == sent["tip_id"]
    await watcher.close()
    # 3. abandoned: still unpaid an hour on, its intent is cancelled
    await db.execute("UPDATE tips SET updated_at = now() - interval '2 hours' "
                     "WHERE public_id = $1", second["tip_id"])
    done = await tips.sweep()
    assert done["cancelled"] == 1
    assert await db.fetchval("SELECT state FROM tips WHERE public_id = $1",
                             second["tip_id"]) == "cancelled"
    # a late confirm of the cancelled intent is refused by the gateway (Stripe's rule)
    resp = await confirm(http, fan, second["tip_id"])
    assert resp.status_code == 409
    assert await db.fetchval("SELECT count(*) FROM outbound_events "
                             "WHERE type = 'tip.paid'") == 1
    await tip_money_agrees(db, app.state.redis)


from tests import payments_fixtures as pf  # noqa: E402

stub = pf.stub
stripe_server = pf.stripe_server
client = pf.client


async def test_a_tip_through_stripe_is_paid_by_the_signed_webhook(stripe_server, stub,
                                                                  client, make_token):
    """The real stripe SDK against the loopback Stripe stub: the tip's PaymentIntent,
    the buyer confirming in 'Stripe.js', then Stripe's signed webhooks (succeeded, a
    duplicate, charge.refunded) reaching the tip through POST /v1/webhooks/stripe."""
    creator = bearer(make_token(CREATOR, Role.CREATOR))
    drop_id = await live_drop(client, creator)
    fan = make_token("fan-1", Role.VIEWER, name="Ada")
    resp = await tip(client, fan, drop_id, amount=1000)
    assert resp.status_code == 201, resp.text
    sent = resp.json()
    assert sent["intent_id"].startswith("pi_") and sent["client_secret"]
    intent = stub.intents[sent["intent_id"]]
    assert intent["metadata"]["tip_id"] == sent["tip_id"] and intent["amount"] == 1000
    retried = (await tip(client, fan, drop_id, amount=1000)).json()  # a client's retry
    assert retried["tip_id"] == sent["tip_id"] and retried["intent_id"] == sent["intent_id"]
    assert len([i for i in stub.intents.values()
                if (i.get("metadata") or {}).get("tip_id") == sent["tip_id"]]) == 1
    stub.confirm_as_buyer(sent["intent_id"], "pm_card_visa")
    url = stripe_server.base_url + "/v1/webhooks/stripe"
    event = stub.event_for("payment_intent.succeeded", sent["intent_id"])
    first = await stub.deliver(url, event)
    assert first.status_code == 200 and first.json()["result"] == "processed"
    again = await stub.deliver(url, event)
    assert again.json()["result"] == "duplicate"
    db = stripe_server.app.state.db
    row = await db.fetchrow("SELECT state, amount_received, fee, announced FROM tips")
    assert row["state"] == "paid" and row["amount_received"] == 1000 and row["announced"]
    assert row["fee"] > 0  # Stripe's fee, for the settlement
    # refunded outside the server (Stripe's dashboard): charge.refunded records it
    await stripe_server.app.state.payments_gateway.refund(
        sent["intent_id"], idempotency_key="dashboard-refund")
    charge = stub.intents[sent["intent_id"]]["latest_charge"]
    r = await stub.deliver(url, stub.event_for("charge.refunded", charge))
    assert r.json()["result"] == "processed"
    row = await db.fetchrow("SELECT state, amount_refunded FROM tips")
    assert dict(row) == {"state": "refunded", "amount_refunded": 1000}
    assert await db.fetchval("SELECT count(*) FROM outbound_events "
                             "WHERE type = 'tip.paid'") == 1
