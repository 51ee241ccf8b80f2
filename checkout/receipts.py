"""What a buyer bought: their orders and tips as receipts, newest first.

A receipt is what Stripe's or Shopify's receipt shows a buyer: what was bought (the
product, its variant, how many, at what price), the total, what was paid and refunded,
the payment's reference, the dates (ordered, paid, refunded) and where the purchase
stands -- ``state`` as the pipeline names it (:mod:`checkout.order_states`: ``held``,
``payment_pending``, ``authorized``, ``paid``, ``failed``, ``expired``, ``cancelled``,
``refunded``, ``disputed``; a tip: ``payment_pending``, ``paid``, ``failed``,
``cancelled``, ``refunded``). One shape for both kinds (``kind``: ``order`` or ``tip``),
so a list of them reads as one history.

:func:`list_receipts` pages through one buyer's receipts with an opaque cursor
(:func:`encode_cursor`): the position ``(created_at, kind, id)`` of the last receipt of
the page, so a page never repeats or skips one while new purchases arrive at the top.
Everything here reads PostgreSQL only (the source of truth); routes are
:mod:`checkout.receipts_api`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

__all__ = ["KINDS", "Cursor", "CursorError", "decode_cursor", "encode_cursor",
           "list_receipts", "order_receipt", "receipt_json"]

KINDS = ("order", "tip")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^(order|tip)\.(\d{1,19})\.(\d{1,19})$")
MAX_CURSOR = 80

_ORDER_COLS = """o.id, o.public_id, o.drop_id, o.product_id, o.variant_id, o.user_id,
    o.quantity, o.buyer_number, o.unit_price, o.amount, o.currency, o.state, o.released,
    o.payment_flow, o.hold_expires_at, o.created_at, o.paid_at, o.refunded_at,
    d.title AS drop_title, d.creator_id, COALESCE(NULLIF(u.display_name, ''), d.creator_id)
        AS host_name,
    pr.title AS product_title, pr.image_url AS product_image,
    v.title AS variant_title, v.options AS variant_options, v.image_url AS variant_image,
    p.gateway, p.intent_id, p.status AS pay_status, p.amount_received, p.amount_refunded,
    p.last_error"""
_ORDER_FROM = """FROM orders o JOIN drops d ON d.id = o.drop_id
    LEFT JOIN users u ON u.id = d.creator_id
    JOIN products pr ON pr.id = o.product_id
    LEFT JOIN drop_product_variants v ON v.id = o.variant_id
    LEFT JOIN payments p ON p.order_id = o.id"""
_TIP_COLS = """t.id, t.public_id, t.drop_id, t.user_id, t.amount, t.currency, t.message,
    t.state, t.gateway, t.intent_id, t.status AS pay_status, t.amount_received,
    t.amount_refunded, t.last_error, t.created_at, t.paid_at, t.refunded_at,
    d.title AS drop_title, d.creator_id, COALESCE(NULLIF(u.display_name, ''), d.creator_id)
        AS host_name"""
_TIP_FROM = """FROM tips t JOIN drops d ON d.id = t.drop_id
    LEFT JOIN users u ON u.id = d.creator_id"""
# per kind: its columns, its tables, the alias of its own table
_SOURCES = {"order": (_ORDER_COLS, _ORDER_FROM, "o"), "tip": (_TIP_COLS, _TIP_FROM, "t")}
# the open states in which a hold's expiry still matters to the buyer
_OPEN = ("held", "payment_pending")


class CursorError(ValueError):
    """A cursor this server did not issue (or one mangled on the way)."""


@dataclass(frozen=True)
class Cursor:
    """A position in a buyer's receipts: the last one of the previous page."""

    created_at: datetime
    kind: str
    id: int


def encode_cursor(c: Cursor) -> str:
    us = (c.created_at - _EPOCH) // timedelta(microseconds=1)
    raw = f"{c.kind}.{us}.{c.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    if not text or len(text) > MAX_CURSOR:
        raise CursorError("cursor is not one this server issued")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise CursorError("cursor is not one this server issued") from None
    m = _CURSOR.fullmatch(raw)
    if m is None:
        raise CursorError("cursor is not one this server issued")
    try:
        created = _EPOCH + timedelta(microseconds=int(m.group(2)))
    except OverflowError:
        raise CursorError("cursor is not one this server issued") from None
    return Cursor(created, m.group(1), int(m.group(3)))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _payment(row: asyncpg.Record) -> dict[str, Any] | None:
    if row["intent_id"] is None:
        return None
    return {"gateway": row["gateway"], "reference": row["intent_id"],
            "status": row["pay_status"], "error": row["last_error"]}


def receipt_json(kind: str, row: asyncpg.Record) -> dict[str, Any]:
    """One receipt (see the module docstring) from an order's or a tip's row."""
    common = {
        "kind": kind, "id": row["public_id"], "drop_id": row["drop_id"],
        "drop_title": row["drop_title"],
        "seller": {"id": row["creator_id"], "name": row["host_name"]},
        "state": row["state"], "currency": row["currency"].strip(),
        "amount_paid": row["amount_received"] or 0,
        "amount_refunded": row["amount_refunded"] or 0,
        "payment": _payment(row), "created_at": _iso(row["created_at"]),
        "paid_at": _iso(row["paid_at"]), "refunded_at": _iso(row["refunded_at"])}
    if kind == "tip":
        return {**common, "items": [{
            "product_id": None, "variant_id": None, "title": "Tip",
            "variant_title": None, "options": {}, "image_url": "", "quantity": 1,
            "unit_price": row["amount"], "amount": row["amount"]}],
            "total": row["amount"], "message": row["message"], "buyer_number": None,
            "released": None, "flow": "client_confirm", "hold_expires_at": None}
    variant = row["variant_id"] is not None and row["variant_title"] is not None
    item = {"product_id": row["product_id"], "variant_id": row["variant_id"],
            "title": row["product_title"],
            "variant_title": row["variant_title"] if variant else None,
            "options": (row["variant_options"] or {}) if variant else {},
            "image_url": (row["variant_image"] if variant else "") or row["product_image"],
            "quantity": row["quantity"], "unit_price": row["unit_price"],
            "amount": row["amount"]}
    return {**common, "items": [item], "total": row["amount"], "message": None,
            "buyer_number": row["buyer_number"], "released": row["released"],
            "flow": row["payment_flow"],
            "hold_expires_at": (_iso(row["hold_expires_at"])
                                if row["state"] in _OPEN else None)}


async def order_receipt(db: asyncpg.Pool, order_public_id: str) -> tuple[dict[str, Any],
                                                                         str, str] | None:
    """An order's receipt, its buyer and its drop's creator (None: no such order)."""
    row = await db.fetchrow(f"SELECT {_ORDER_COLS} {_ORDER_FROM} WHERE o.public_id = $1",
                            order_public_id)
    if row is None:
        return None
    return receipt_json("order", row), row["user_id"], row["creator_id"]


async def list_receipts(db: asyncpg.Pool, user_id: str, *, limit: int,
                        drop_id: int | None = None, kind: str | None = None,
                        after: Cursor | None = None
                        ) -> tuple[list[dict[str, Any]], str | None]:
    """A page of ``user_id``'s receipts, newest first (``created_at``, then tips
    before orders of the same instant, then the higher id), after ``after``; and the
    cursor of the next page (None: this was the last)."""
    c_at, c_kind, c_id = ((after.created_at, after.kind, after.id) if after is not None
                          else (None, None, None))
    rows: list[tuple[str, asyncpg.Record]] = []
    for k in KINDS:
        if kind not in (None, k):
            continue
        cols, source, a = _SOURCES[k]
        rows += [(k, r) for r in await db.fetch(
            f"""SELECT {cols} {source}
                WHERE {a}.user_id = $1 AND ($2::bigint IS NULL OR {a}.drop_id = $2)
                  AND ($3::timestamptz IS NULL
                       OR ({a}.created_at, '{k}', {a}.id) < ($3, $4::text, $5::bigint))
                ORDER BY {a}.created_at DESC, {a}.id DESC LIMIT $6""",
            user_id, drop_id, c_at, c_kind, c_id, limit + 1)]
    rows.sort(key=lambda kr: (kr[1]["created_at"], kr[0], kr[1]["id"]), reverse=True)
    page = rows[:limit]
    nxt = None
    if len(rows) > limit:
        k, last = page[-1]
        nxt = encode_cursor(Cursor(last["created_at"], k, last["id"]))
    return [receipt_json(k, r) for k, r in page], nxt
