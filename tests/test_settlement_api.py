"""Settlement end to end: paid orders through the real worker and stripe SDK, stakes,
POST /settle (ledger, Connect transfers, ended -> settled), the report, and a refund
after settlement reversing ledger entries."""

from __future__ import annotations

import asyncpg

from dropserver.auth import Role, issue_token
from tests import payments_fixtures as pf
from tests.payments_fixtures import add_reserve, make_drop, save_card

stub = pf.stub
stripe_server = pf.stripe_server
client = pf.client

FEE = (2500 * 29 + 500) // 1000 + 30  # the stub's 2.9% + 30 on 25.00


def _auth(settings, sub: str, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, sub, role)}"}


async def _ledger(db, drop_id: int) -> dict[tuple[str, str | None], int]:
    return {(r["account"], r["party_id"]): int(r["s"]) for r in await db.fetch(
        "SELECT account, party_id, sum(amount) AS s FROM ledger_entries WHERE drop_id = $1 "
        "GROUP BY 1, 2", drop_id)}


async def test_settle_pays_out_exactly_and_refund_reverses(settings, stripe_server, stub,
                                                          client) -> None:
    db = await asyncpg.connect(settings.database_url)
    redis = stripe_server.app.state.redis
    creator = _auth(settings, "creator-1", Role.CREATOR)
    try:
        drop_id, product_id = await make_drop(db, price=2500, cogs=1000)
        await db.execute("INSERT INTO creators (user_id, stripe_account_id) "
                         "VALUES ('creator-1', 'acct_creator')")
        holds = []
        for i in range(4):
            await save_card(db, f"sb-{i}")
            holds.append(await add_reserve(redis, drop_id, product_id, f"sb-{i}",
                                           flow="off_session"))
        for hold in holds:
            await pf.wait_state(db, hold, "paid")

        # stakes: validation and ownership
        url = f"/v1/drops/{drop_id}/stakes"
        r = await client.post(url, json={"investor_id": "inv-a", "amount": 0},
                              headers=creator)
        assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "amount"
        r = await client.post(url, json={"investor_id": "inv-a", "amount": 5,
                                         "stripe_account_id": "bank"}, headers=creator)
        assert r.status_code == 422
        r = await client.post(url, json={"investor_id": "inv-a", "amount": 5},
                              headers=_auth(settings, "creator-2", Role.CREATOR))
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_drop_owner"
        r = await client.post(url, json={"investor_id": "inv-a", "amount": 5},
                              headers=_auth(settings, "sb-0", Role.VIEWER))
        assert r.status_code == 403
        for inv, amount in (("inv-a", 3000), ("inv-b", 1000)):
            r = await client.post(url, json={"investor_id": inv, "amount": amount,
                                             "stripe_account_id": f"acct_{inv}"},
                                  headers=creator)
            assert r.status_code == 201
        assert [s["amount"] for s in r.json()["stakes"]] == [3000, 1000]

        # not ended yet
        r = await client.post(f"/v1/drops/{drop_id}/settle", headers=creator)
        assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_transition"
        await db.execute("UPDATE drops SET state = 'ended' WHERE id = $1", drop_id)

        r = await client.post(f"/v1/drops/{drop_id}/settle", headers=creator)
        assert r.status_code == 200, r.text
        t = r.json()["totals"]
        assert t == {"gross": 10000, "refunds": 0, "net_revenue": 10000,
                     "payment_fees": 4 * FEE, "platform_fee": 1000,
                     "net_platform_fee": 1000 - 4 * FEE, "cogs": 4000, "profit": 5000,
                     "shortfall": 0, "profit_platform": 1250, "profit_creator": 1250,
                     "profit_investors": 2500, "creator_payout": 5250,
                     "tips": {"gross": 0, "refunds": 0, "payment_fees": 0,
                              "platform_fee": 0, "creator": 0}}  # no tips in this drop
        assert r.json()["investors"] == [
            {"investor_id": "inv-a", "stake": 3000, "share": 1875},
            {"investor_id": "inv-b", "stake": 1000, "share": 625}]
        assert r.json()["state"] == "settled"
        assert await db.fetchval("SELECT state FROM drops WHERE id = $1", drop_id) \
            == "settled"
        transfers = sorted((t["destination"], t["amount"], t["transfer_group"])
                           for t in stub.transfers.values()
                           if t["transfer_group"] == f"drop_{drop_id}")
        assert transfers == [("acct_creator", 5250, f"drop_{drop_id}"),
                             ("acct_inv-a", 1875, f"drop_{drop_id}"),
                             ("acct_inv-b", 625, f"drop_{drop_id}")]
        ledger = await _ledger(db, drop_id)
        assert ledger[("gross", None)] == 10000
        assert ledger[("profit_investor", "inv-a")] == 1875
        assert ledger[("cogs", "creator-1")] == 4000

        # settling again sends nothing new and writes nothing new
        entries = await db.fetchval("SELECT count(*) FROM ledger_entries")
        count = stub.count("POST /v1/transfers")
        r = await client.post(f"/v1/drops/{drop_id}/settle", headers=creator)
        assert r.status_code == 200
        assert stub.count("POST /v1/transfers") == count
        assert await db.fetchval("SELECT count(*) FROM ledger_entries") == entries

        # a refund after settlement reverses entries (negative deltas)
        row = await pf.order_row(db, holds[0])
        gw = stripe_server.app.state.payments_gateway
        await gw.refund(row["intent_id"], idempotency_key=f"refund:{holds[0]}")
        charge = stub.intents[row["intent_id"]]["latest_charge"]
        resp = await stub.deliver(stripe_server.base_url + "/v1/webhooks/stripe",
                                  stub.event_for("charge.refunded", charge))
        assert resp.status_code == 200
        ledger = await _ledger(db, drop_id)
        assert ledger[("refund", None)] == -2500
        assert ledger[("cogs", "creator-1")] == 3000
        assert ledger[("platform_fee", None)] == 750
        # profit 7500 - 750 - 3000 = 3750 -> 937/938 split, investors 1875 -> 1406/469
        assert ledger[("profit_platform", None)] + ledger[("profit_creator", "creator-1")] \
            + ledger[("profit_investor", "inv-a")] + ledger[("profit_investor", "inv-b")] \
            == 3750
        negatives = await db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE drop_id = $1 AND amount < 0 "
            "AND memo = 'reversal after refund'", drop_id)
        assert negatives >= 5

        # the report: investors may read it, strangers may not
        r = await client.get(f"/v1/drops/{drop_id}/settlement",
                             headers=_auth(settings, "inv-a", Role.INVESTOR))
        assert r.status_code == 200
        rep = r.json()
        assert rep["totals"]["refunds"] == 2500 and rep["totals"]["profit"] == 3750
        ledger_sum = {(e["account"], e["party_id"]): e["amount"] for e in rep["ledger"]}
        assert ledger_sum[("profit_investor", "inv-a")] == rep["investors"][0]["share"]
        assert {p["role"] for p in rep["payouts"]} == {"creator", "investor", "platform"}
        r = await client.get(f"/v1/drops/{drop_id}/settlement",
                             headers=_auth(settings, "nobody", Role.VIEWER))
        assert r.status_code == 403
        r = await client.post(url, json={"investor_id": "inv-c", "amount": 5},
                              headers=creator)
        assert r.status_code == 409 and r.json()["error"]["code"] == "drop_settled"
    finally:
        await db.close()


async def test_unknown_drop_and_guests(settings, stripe_server, client) -> None:
    r = await client.get("/v1/drops/999999/settlement",
                         headers=_auth(settings, "a", Role.ADMIN))
    assert r.status_code == 404 and r.json()["error"]["code"] == "drop_not_found"
    r = await client.post("/v1/drops/1/settle")
    assert r.status_code == 401
