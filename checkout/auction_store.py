"""Auctions in PostgreSQL: the ``auctions`` row, every accepted bid, the outcome.

Redis decides (:mod:`checkout.auction`); PostgreSQL keeps the record the audit and
the replay read. Nothing here runs on a bid's hot path: bids are copied from the
auction's bid stream in batches by :class:`checkout.auctions_api.AuctionKeeper`,
``ON CONFLICT DO NOTHING``, so a copy repeated by another process or after a crash
changes nothing.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from checkout.auction_rules import AuctionSpec, bands_of
from checkout.journal import HoldJournal
from realtime import chat

__all__ = ["BidJournal", "active_bans", "close_from_order", "flow_for", "insert_auction",
           "load_auction", "load_auctions", "load_bids", "max_seq", "record_bids",
           "record_close", "record_offer", "running_auctions", "set_clock"]

_COLS = """id, drop_id, product_id, creator_id, state, currency, start_price, increments,
           reserve_price, duration_ms, snipe_window_ms, started_at_ms, ends_at_ms,
           closed_at_ms, final_ends_at_ms, outcome, bids, winner_id, winning_amount,
           winning_seq, hold_id, offer_user_id, offer_amount, offer_hold_id"""


def _row(record: asyncpg.Record | None) -> dict[str, Any] | None:
    if record is None:
        return None
    row = dict(record)
    row["currency"] = row["currency"].strip()
    row["increments"] = [list(b) for b in bands_of(row["increments"])]
    return row


async def insert_auction(conn: asyncpg.Connection, drop_id: int, creator_id: str,
                         spec: AuctionSpec, currency: str, now_ms: int) -> int:
    """A new running auction (its clock set by :func:`set_clock` once Redis started
    it, in the same transaction). Raises :class:`asyncpg.UniqueViolationError` when
    the product already has a running auction."""
    return await conn.fetchval(
        """INSERT INTO auctions (drop_id, product_id, creator_id, currency, start_price,
               increments, reserve_price, duration_ms, snipe_window_ms, started_at_ms,
               ends_at_ms)
           VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10::bigint, $10::bigint + $8::int)
           RETURNING id""",
        drop_id, spec.product_id, creator_id, currency, spec.start_price,
        [list(b) for b in spec.increments], spec.reserve_price,
        spec.duration_ms, spec.snipe_window_ms, now_ms)


async def set_clock(conn: asyncpg.Connection, auction_id: int, started_at: int,
                    ends_at: int) -> None:
    await conn.execute("UPDATE auctions SET started_at_ms = $2, ends_at_ms = $3 WHERE id = $1",
                       auction_id, started_at, ends_at)


async def load_auction(db: Any, auction_id: int) -> dict[str, Any] | None:
    return _row(await db.fetchrow(f"SELECT {_COLS} FROM auctions WHERE id = $1", auction_id))


async def load_auctions(db: Any, drop_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {_COLS} FROM auctions WHERE drop_id = $1 ORDER BY id",
                          drop_id)
    return [r for r in map(_row, rows) if r is not None]


async def load_bids(db: Any, auction_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT seq, user_id, display_name, amount, at_ms, ends_at_ms, extended,
                  idempotency_key
           FROM auction_bids WHERE auction_id = $1 ORDER BY seq""", auction_id)
    return [dict(r) for r in rows]


async def max_seq(db: Any, auction_id: int) -> int:
    return await db.fetchval(
        "SELECT coalesce(max(seq), 0) FROM auction_bids WHERE auction_id = $1", auction_id)


async def record_bids(db: Any, auction_id: int, bids: list[dict[str, Any]]) -> None:
    """Accepted bids (:func:`checkout.auction.read_bids`' rows), once each."""
    if not bids:
        return
    bids = sorted(bids, key=lambda b: b["seq"])  # one key order for every writer
    cols = ("seq", "user_id", "display_name", "amount", "at_ms", "ends_at_ms", "extended",
            "idempotency_key")
    await db.execute(
        """INSERT INTO auction_bids (auction_id, seq, user_id, display_name, amount, at_ms,
               ends_at_ms, extended, idempotency_key)
           SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[], $5::bigint[],
                                    $6::bigint[], $7::bigint[], $8::bool[], $9::text[])
           ON CONFLICT DO NOTHING""",
        auction_id, *[[b[c] for b in bids] for c in cols])


async def record_close(db: Any, auction_id: int, a: dict[str, Any]) -> bool:
    """The close as Redis recorded it (the auction's hash, :func:`checkout.auction.read`);
    True when this call wrote it."""
    seq = int(a.get("seq") or 0)
    outcome = a["outcome"]
    has_leader = seq > 0 and outcome != "no_bids"
    result = await db.execute(
        """UPDATE auctions SET state = 'closed', outcome = $2, closed_at_ms = $3,
               final_ends_at_ms = $4, bids = $5, winner_id = $6, winning_amount = $7,
               winning_seq = $8, hold_id = $9
           WHERE id = $1 AND state = 'running'""",
        auction_id, outcome, a["closed_at"], a["ends_at"], seq,
        a["leader"] if has_leader else None, a["amount"] if has_leader else None,
        seq if has_leader else None, a.get("hold_id") or None)
    return result.endswith(" 1")


async def record_offer(db: Any, auction_id: int, user_id: str, amount: int,
                       hold_id: str) -> None:
    await db.execute(
        """UPDATE auctions SET offer_user_id = $2, offer_amount = $3, offer_hold_id = $4
           WHERE id = $1""", auction_id, user_id, amount, hold_id)


async def flow_for(db: Any, user_id: str) -> str:
    """``off_session`` (one tap) for a user with a saved card, else ``client_confirm``."""
    card = await db.fetchval("SELECT default_payment_method FROM users WHERE id = $1",
                             user_id)
    return "off_session" if card else "client_confirm"


async def active_bans(db: Any, drop_id: int, creator_id: str) -> dict[str, str]:
    """The drop's active bans as the chat's moderation hash keeps them
    (``user -> "ban:<until ms, 0: until lifted>"``, realtime/chat.py): put back with
    an auction after a Redis loss, so a banned viewer stays unable to bid."""
    return {user: entry for user, entry in
            (await chat.active_moderation(db, drop_id, creator_id)).items()
            if entry.startswith("ban:")}


async def running_auctions(db: Any) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {_COLS} FROM auctions WHERE state = 'running'")
    return [r for r in map(_row, rows) if r is not None]


async def close_from_order(db: Any, auction_id: int) -> bool:
    """Redis closed the auction and lost it before its close was recorded: the
    winner's order (idempotency key ``auction:<id>``, written by the hold journal)
    says who won at what; record that close. False when there is no such order."""
    order = await db.fetchrow(
        """SELECT o.user_id, o.amount, o.public_id, o.hold_expires_at FROM orders o
           JOIN auctions a ON a.id = $1 AND o.drop_id = a.drop_id
           WHERE o.idempotency_key = 'auction:' || $1::text""", auction_id)
    if order is None:
        return False
    seq = await db.fetchval("SELECT seq FROM auction_bids WHERE auction_id = $1 AND "
                            "user_id = $2 AND amount = $3", auction_id, order["user_id"],
                            order["amount"])
    await db.execute(
        """UPDATE auctions SET state = 'closed', outcome = 'sold', winner_id = $2,
               winning_amount = $3, winning_seq = $4, hold_id = $5,
               bids = (SELECT count(*) FROM auction_bids WHERE auction_id = $1),
               closed_at_ms = COALESCE(closed_at_ms, ends_at_ms),
               final_ends_at_ms = COALESCE(final_ends_at_ms,
                   (SELECT max(ends_at_ms) FROM auction_bids WHERE auction_id = $1),
                   ends_at_ms)
           WHERE id = $1 AND state = 'running'""",
        auction_id, order["user_id"], order["amount"], seq, order["public_id"])
    return True


class BidJournal(HoldJournal):
    """Every accepted bid, also written to PostgreSQL by the process that accepted it.

    The keeper copies bids from the auction's bid stream, but the stream lives in
    Redis, and a Redis that restarts empty before the copy would take bids whose
    bidders were told "you lead". So the process that answered keeps each accepted bid
    here (``add((auction_id, row))``: one list append on the bid path) and a task
    writes them a few milliseconds later, ``ON CONFLICT DO NOTHING`` (the keeper's
    copy is the same row), waiting outages out: the hold journal's machinery
    (:class:`checkout.journal.HoldJournal`) with its own write.
    """

    WHAT = "bid journal"

    async def flush(self) -> int:
        written = 0
        while self._rows:
            batch = self._rows[:500]
            by_auction: dict[int, list[dict[str, Any]]] = {}
            for auction_id, bid in batch:
                by_auction.setdefault(auction_id, []).append(bid)
            for auction_id, bids in by_auction.items():
                await record_bids(self.db, auction_id, bids)
            del self._rows[:len(batch)]
            written += len(batch)
        return written
