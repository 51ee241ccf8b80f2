"""The ``orders`` row of a hold: its columns, and the one insert every writer uses.

Two writers record a hold as an ``orders`` row: the order worker (its first step for a
``type=reserve`` entry, :mod:`checkout.orders`) and the hold journal of the process
that acknowledged the hold (:mod:`checkout.journal`). Both call :func:`insert_orders`,
once per hold (``ON CONFLICT DO NOTHING``), under an advisory lock that recovery takes
exclusively while it records and makes its read of a drop (:mod:`checkout.recovery`),
so a row either lands before a rebuild read or is recorded ``lost`` after it.
"""

from __future__ import annotations

import asyncpg

__all__ = ["ORDER_COLUMNS", "REBUILD_LOCK_NS", "insert_orders", "lock_key", "order_columns"]

ORDER_COLUMNS = ("id", "public_id", "drop_id", "product_id", "variant_id", "user_id",
                 "quantity",
                 "buyer_number", "unit_price", "amount", "currency", "state",
                 "payment_flow", "hold_expires_at", "released", "told")


def order_columns(alias: str = "") -> str:
    """The ``orders`` columns every processor method reads, for a SELECT list."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c for c in ORDER_COLUMNS)


# Order inserts take this lock shared per drop; recovery takes it exclusively while it
# records the time of its read and reads the drop's orders (checkout/recovery.py).
REBUILD_LOCK_NS = 0x686F6C64  # "hold"


def lock_key(drop_id: int) -> int:
    """The second key of a drop's advisory lock (PostgreSQL's two-int form)."""
    return int(drop_id) % 2_147_483_647


async def insert_orders(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    """Insert holds as ``orders`` rows, once each (``ON CONFLICT DO NOTHING``); call in
    a transaction. A row is ``(public_id, drop_id, product_id, user_id, quantity,
    buyer_number, unit_price, amount, currency, idempotency_key, expires_at_ms, flow,
    created_at_ms, state, released[, variant_id])`` (no variant_id: None, a product
    without variants).

    A hold made before recovery last read its drop's orders (``drop_rebuilds``) and
    arriving only now is one the rebuilt Redis does not count and may have sold
    again: it is recorded ``failed`` with ``released = 'lost'`` (never counted, its
    buyer told). The shared lock makes every insert land either before the read or
    after its record. ``created_at`` is when the hold was made (``created_at_ms``,
    Redis' clock; now when 0), not when its row arrived: the buyer's "ordered at" and
    the order of their receipts, whichever writer recorded it."""
    if not rows:
        return
    # One order for every writer's keys (hold ids, user ids): the journal, the order
    # workers and recovery insert overlapping rows at once, and two inserts taking
    # each other's keys in opposite orders deadlock. (A row without variant_id: None.)
    cols = list(zip(*sorted((row if len(row) == 16 else (*row, None) for row in rows),
                            key=lambda r: r[0]), strict=True))
    drops = sorted({lock_key(d) for d in cols[1]})
    await conn.execute(
        "SELECT pg_advisory_xact_lock_shared($1, d) FROM unnest($2::int[]) AS d",
        REBUILD_LOCK_NS, drops)
    await conn.execute(
        "INSERT INTO users (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        sorted(set(cols[3])))
    await conn.execute(
        """INSERT INTO orders (public_id, drop_id, product_id, user_id, quantity,
               buyer_number, unit_price, amount, currency, idempotency_key,
               hold_expires_at, payment_flow, state, released, variant_id, created_at)
           SELECT t.public_id, t.drop_id, t.product_id, t.user_id, t.quantity,
                  t.buyer_number, t.unit_price, t.amount, t.currency, t.idempotency_key,
                  to_timestamp(t.expires_ms::double precision / 1000), t.flow,
                  CASE WHEN g.lost THEN 'failed' ELSE t.state END,
                  CASE WHEN g.lost THEN 'lost' ELSE t.released END, t.variant_id,
                  CASE WHEN t.created_ms > 0
                       THEN to_timestamp(t.created_ms::double precision / 1000)
                       ELSE now() END
           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::int[],
                       $6::int[], $7::bigint[], $8::bigint[], $9::text[], $10::text[],
                       $11::bigint[], $12::text[], $13::bigint[], $14::text[],
                       $15::text[], $16::bigint[])
                AS t(public_id, drop_id, product_id, user_id, quantity, buyer_number,
                     unit_price, amount, currency, idempotency_key, expires_ms, flow,
                     created_ms, state, released, variant_id)
           CROSS JOIN LATERAL (
               SELECT t.created_ms > 0 AND EXISTS (
                   SELECT 1 FROM drop_rebuilds r
                   WHERE r.drop_id = t.drop_id AND r.read_at_ms > t.created_ms) AS lost) g
           ON CONFLICT DO NOTHING""", *[list(c) for c in cols])
