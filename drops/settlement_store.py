"""Settlement I/O: read a drop's sales, write its ledger, pay out through the gateway.

The arithmetic is :mod:`drops.settlement`; this module only moves numbers between it,
PostgreSQL and the gateway.

Ledger (``ledger_entries``): the settlement is posted as *deltas* against what is
already on the ledger for the drop, one entry per (account, party) that changed, under
revision ``r`` with the idempotency key ``settle:<drop>:<r>:<account>:<party>``
(UNIQUE). The first posting writes the whole settlement; a refund or lost dispute after
that re-computes the settlement and posts only the differences, as negative entries
("refunds reverse entries"). Summing a drop's entries per account always gives the
current settlement. Postings of one drop are serialised by a transaction-scoped
advisory lock.

Payouts (``payouts``): one row per (drop, party, role); creators and investors are
paid by a Connect transfer (``transfer_group = "drop_<id>"``, idempotency key
``payout:<drop>:<role>:<party>``) to their ``stripe_account_id``; the platform's part
stays on the platform account. Stripe does not reverse transfers when a charge is
refunded: a refund after payouts shows on the ledger and the report, not as a transfer
reversal.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import asyncpg

from checkout.order_entries import transfer_group
from checkout.payments import Gateway, GatewayError
from drops.lifecycle import Action, DropState, IllegalTransition
from drops.settlement import Sale, Settlement, Split, settle
from dropserver.outbound import EventType, enqueue

__all__ = ["compute", "ledger_targets", "pay_out", "post_ledger", "report",
           "reverse_if_settled", "settle_drop"]

log = logging.getLogger("dropserver.settlement")

_SOLD = ("paid", "refunded", "disputed")
_LOCK_NS = 0x736574  # "set"


async def load_sales(db: Any, drop_id: int) -> list[Sale]:
    rows = await db.fetch(
        """SELECT o.id, p.amount_received, p.amount_refunded, p.fee,
                  dp.cogs * o.quantity AS cogs, o.state
           FROM orders o
           JOIN payments p ON p.order_id = o.id
           JOIN drop_products dp ON dp.drop_id = o.drop_id AND dp.product_id = o.product_id
           WHERE o.drop_id = $1 AND o.state = ANY($2::text[]) AND p.amount_received > 0
           ORDER BY o.id""", drop_id, list(_SOLD))
    return [Sale(order_id=r["id"], amount=r["amount_received"],
                 refunded=r["amount_received"] if r["state"] == "refunded"
                 else min(r["amount_refunded"], r["amount_received"]),
                 payment_fee=r["fee"], cogs=r["cogs"]) for r in rows]


async def load_tips(db: Any, drop_id: int) -> list[Sale]:
    """The drop's paid (or since refunded) tips, as sales without COGS."""
    rows = await db.fetch(
        """SELECT id, amount_received, amount_refunded, fee, state FROM tips
           WHERE drop_id = $1 AND state IN ('paid', 'refunded') AND amount_received > 0
           ORDER BY id""", drop_id)
    return [Sale(order_id=r["id"], amount=r["amount_received"],
                 refunded=r["amount_received"] if r["state"] == "refunded"
                 else min(r["amount_refunded"], r["amount_received"]),
                 payment_fee=r["fee"]) for r in rows]


async def compute(db: Any, drop_id: int) -> tuple[dict[str, Any], Settlement,
                                                 dict[str, int]]:
    drop = await db.fetchrow(
        """SELECT id, creator_id, state, currency, platform_fee_bps, split_platform_bps,
                  split_creator_bps, split_investors_bps FROM drops WHERE id = $1""",
        drop_id)
    if drop is None:
        raise LookupError(drop_id)
    stakes = {r["investor_id"]: r["amount"] for r in await db.fetch(
        "SELECT investor_id, amount FROM investor_stakes WHERE drop_id = $1", drop_id)}
    split = Split(drop["platform_fee_bps"], drop["split_platform_bps"],
                  drop["split_creator_bps"], drop["split_investors_bps"])
    result = settle(await load_sales(db, drop_id), split, stakes,
                    tips=await load_tips(db, drop_id))
    return dict(drop), result, stakes


def ledger_targets(s: Settlement, creator_id: str) -> dict[tuple[str, str], int]:
    """What the ledger of a drop must sum to per (account, party) ("" = none)."""
    out = {
        ("gross", ""): s.gross,
        ("refund", ""): -s.refunds,
        ("payment_fees", ""): s.payment_fees,
        ("platform_fee", ""): s.platform_fee,
        ("cogs", creator_id): s.cogs,
        ("profit_platform", ""): s.profit_platform,
        ("profit_creator", creator_id): s.profit_creator,
    }
    for investor, share in s.investors.items():
        out[("profit_investor", investor)] = share
    out.update({("tips", ""): s.tips_gross, ("tip_refunds", ""): -s.tips_refunds,
                ("tip_payment_fees", ""): s.tips_payment_fees,
                ("tip_platform_fee", ""): s.tips_platform_fee,
                ("tips_creator", creator_id): s.tips_creator})
    return out


async def post_ledger(conn: asyncpg.Connection, drop_id: int, s: Settlement,
                      creator_id: str, currency: str, memo: str) -> int:
    """Post the differences between ``s`` and the ledger; returns entries written.
    Call inside a transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NS, drop_id)
    posted: dict[tuple[str, str], int] = defaultdict(int)
    for r in await conn.fetch(
            "SELECT account, COALESCE(party_id, '') AS party, sum(amount) AS total "
            "FROM ledger_entries WHERE drop_id = $1 GROUP BY 1, 2", drop_id):
        posted[(r["account"], r["party"])] = int(r["total"])
    revision = 1 + await conn.fetchval(
        "SELECT count(DISTINCT split_part(idempotency_key, ':', 3)) FROM ledger_entries "
        "WHERE drop_id = $1 AND idempotency_key LIKE 'settle:%'", drop_id)
    targets = ledger_targets(s, creator_id)
    written = 0
    for key in sorted(set(targets) | set(posted)):
        delta = targets.get(key, 0) - posted.get(key, 0)
        if delta == 0:
            continue
        account, party = key
        await conn.execute(
            """INSERT INTO ledger_entries (drop_id, account, party_id, amount, currency,
                   memo, idempotency_key)
               VALUES ($1, $2, NULLIF($3, ''), $4, $5, $6, $7)
               ON CONFLICT (idempotency_key) DO NOTHING""",
            drop_id, account, party, delta, currency, memo,
            f"settle:{drop_id}:{revision}:{account}:{party}")
        written += 1
    return written


async def pay_out(db: asyncpg.Pool, gateway: Gateway, drop: dict[str, Any],
                  s: Settlement, stakes_accounts: dict[str, str | None]) -> None:
    """Create the payout rows once, then send every transfer not sent yet."""
    drop_id, currency = drop["id"], drop["currency"]
    group = transfer_group(drop_id)
    creator_account = await db.fetchval(
        "SELECT stripe_account_id FROM creators WHERE user_id = $1", drop["creator_id"])
    parties: list[tuple[str, str, int, str | None]] = [
        (drop["creator_id"], "creator", s.creator_payout, creator_account)]
    parties += [(inv, "investor", share, stakes_accounts.get(inv))
                for inv, share in sorted(s.investors.items())]
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO payouts (drop_id, party_id, role, amount, currency,
                   transfer_group, state)
               VALUES ($1, $2, 'platform', $3, $4, $5, 'sent')
               ON CONFLICT DO NOTHING""",
            drop_id, drop["creator_id"], max(s.platform_total, 0), currency, group)
        for party, role, amount, _ in parties:
            await conn.execute(
                """INSERT INTO payouts (drop_id, party_id, role, amount, currency,
                       transfer_group, state)
                   VALUES ($1, $2, $3, $4::bigint, $5, $6, CASE WHEN $4::bigint = 0 THEN 'sent'
                                                        ELSE 'pending' END)
                   ON CONFLICT DO NOTHING""",
                drop_id, party, role, amount, currency, group)
    for party, role, _, destination in parties:
        row = await db.fetchrow(
            "SELECT id, amount, state FROM payouts WHERE drop_id = $1 AND party_id = $2 "
            "AND role = $3", drop_id, party, role)
        if row["state"] == "sent" or row["amount"] == 0:
            continue
        if not destination:
            log.warning("no Connect account for payout",
                        extra={"drop_id": drop_id, "party": party, "role": role})
            continue  # stays pending until the party has an account
        try:
            tr = await gateway.transfer(
                amount=row["amount"], currency=currency, destination=destination,
                transfer_group=group, idempotency_key=f"payout:{drop_id}:{role}:{party}",
                metadata={"drop_id": str(drop_id), "role": role, "party": party})
        except GatewayError as exc:
            log.error("transfer failed", extra={"drop_id": drop_id, "party": party,
                                                "error": str(exc)})
            await db.execute("UPDATE payouts SET state = 'failed' WHERE id = $1", row["id"])
            continue
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE payouts SET state = 'sent', transfer_id = $2 "
                               "WHERE id = $1", row["id"], tr.id)
            await enqueue(conn, EventType.PAYOUT_SENT, {
                "drop_id": drop_id, "party_id": party, "role": role,
                "amount": row["amount"], "currency": currency, "transfer_id": tr.id,
                "transfer_group": group}, creator_id=drop["creator_id"], drop_id=drop_id,
                key=f"payout.sent:{row['id']}")


async def settle_drop(db: asyncpg.Pool, gateway: Gateway, drop_id: int) -> int:
    """Post the ledger and pay out an ended drop; returns how many of its orders were
    still open (held, pending or authorized) at settlement. Idempotent: a second call
    re-sends only payouts that did not go out. Moving the drop ``ended -> settled`` is
    the caller's (:func:`drops.actions.mark_settled`, once this returns): this module
    does not call the layer above it."""
    drop, s, _ = await compute(db, drop_id)
    if drop["state"] not in (DropState.ENDED, DropState.SETTLED):
        raise IllegalTransition(DropState(drop["state"]), Action.SETTLE)
    open_orders = await db.fetchval(
        "SELECT count(*) FROM orders WHERE drop_id = $1 AND state = ANY($2::text[])",
        drop_id, ["held", "payment_pending", "authorized"])
    async with db.acquire() as conn, conn.transaction():
        await post_ledger(conn, drop_id, s, drop["creator_id"], drop["currency"],
                          "settlement")
    accounts = {r["investor_id"]: r["stripe_account_id"] for r in await db.fetch(
        "SELECT investor_id, stripe_account_id FROM investor_stakes WHERE drop_id = $1",
        drop_id)}
    await pay_out(db, gateway, drop, s, accounts)
    return open_orders


async def reverse_if_settled(db: asyncpg.Pool, drop_id: int) -> int:
    """After a refund or lost dispute: post the reversal if the drop was settled."""
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM ledger_entries "
                             "WHERE drop_id = $1)", drop_id):
        return 0
    drop, s, _ = await compute(db, drop_id)
    async with db.acquire() as conn, conn.transaction():
        return await post_ledger(conn, drop_id, s, drop["creator_id"], drop["currency"],
                                 "reversal after refund")


async def report(db: Any, drop_id: int) -> dict[str, Any]:
    """The settlement report: the computation now, the ledger, the payouts."""
    drop, s, stakes = await compute(db, drop_id)
    ledger = await db.fetch(
        "SELECT account, party_id, sum(amount) AS amount, count(*) AS entries "
        "FROM ledger_entries WHERE drop_id = $1 GROUP BY 1, 2 ORDER BY 1, 2", drop_id)
    payouts = await db.fetch(
        "SELECT party_id, role, amount, currency, transfer_group, transfer_id, state "
        "FROM payouts WHERE drop_id = $1 ORDER BY role, party_id", drop_id)
    orders = await db.fetchval(
        "SELECT count(*) FROM orders WHERE drop_id = $1 AND state = ANY($2::text[])",
        drop_id, list(_SOLD))
    return {
        "drop_id": drop_id, "state": drop["state"], "currency": drop["currency"],
        "orders": orders,
        "split": {"platform_fee_bps": drop["platform_fee_bps"],
                  "platform_bps": drop["split_platform_bps"],
                  "creator_bps": drop["split_creator_bps"],
                  "investors_bps": drop["split_investors_bps"]},
        "totals": {
            "gross": s.gross, "refunds": s.refunds, "net_revenue": s.net_revenue,
            "payment_fees": s.payment_fees, "platform_fee": s.platform_fee,
            "net_platform_fee": s.net_platform_fee, "cogs": s.cogs, "profit": s.profit,
            "shortfall": s.shortfall, "profit_platform": s.profit_platform,
            "profit_creator": s.profit_creator, "profit_investors": s.profit_investors,
            "creator_payout": s.creator_payout,
            "tips": {"gross": s.tips_gross, "refunds": s.tips_refunds,
                     "payment_fees": s.tips_payment_fees,
                     "platform_fee": s.tips_platform_fee, "creator": s.tips_creator},
        },
        "investors": [{"investor_id": k, "stake": stakes[k], "share": v}
                      for k, v in sorted(s.investors.items())],
        "ledger": [{"account": r["account"], "party_id": r["party_id"],
                    "amount": int(r["amount"]), "entries": r["entries"]} for r in ledger],
        "payouts": [dict(r) for r in payouts],
        "sales": await sales_by_variant(db, drop_id),
    }


async def sales_by_variant(db: Any, drop_id: int) -> list[dict[str, Any]]:
    """What sold, per product and variant (``variant_id`` None: a product without
    variants): orders, units kept (not refunded), money received and refunded. The
    settlement's gross is the sum of ``received`` (the same orders as
    :func:`load_sales`)."""
    rows = await db.fetch(
        """SELECT o.product_id, o.variant_id, count(*) AS orders,
                  sum(CASE WHEN o.state = 'refunded' THEN 0 ELSE o.quantity END) AS units,
                  sum(p.amount_received) AS received,
                  sum(CASE WHEN o.state = 'refunded' THEN p.amount_received
                           ELSE LEAST(p.amount_refunded, p.amount_received) END) AS refunded
           FROM orders o JOIN payments p ON p.order_id = o.id
           WHERE o.drop_id = $1 AND o.state = ANY($2::text[]) AND p.amount_received > 0
           GROUP BY o.product_id, o.variant_id
           ORDER BY o.product_id, o.variant_id NULLS FIRST""", drop_id, list(_SOLD))
    return [{"product_id": r["product_id"], "variant_id": r["variant_id"],
             "orders": r["orders"], "units": int(r["units"]),
             "received": int(r["received"]), "refunded": int(r["refunded"])} for r in rows]
