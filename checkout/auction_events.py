"""What a bidder may have missed of their auction's private events, from PostgreSQL.

``auction.outbid``, ``auction.won`` and ``auction.offer`` go to the bidder's user
channel, which keeps no history: a socket whose process was re-subscribing to Redis
(a failover, a lost connection), or whose user channel was not yet subscribed, misses
them. :class:`RecentAuctionEvents` is the hub's :class:`realtime.private.PrivateSource`
for them, as :class:`checkout.order_events.RecentOrders` is for ``order.*``: the
*current* event of each auction the user bid in, from ``auctions`` and
``auction_bids`` (bids reach PostgreSQL through the bid journal, a fraction of a
second after Redis accepted them: a bid not journaled yet when recovery reads is not
recovered).

Ranks, per auction (topic ``auction:<id>``): ``auction.outbid`` ranks at the amount of
the user's bid that was beaten (each of their bids is beaten once), ``auction.won``
and ``auction.offer`` above any bid. The recovered ``auction.outbid`` says the auction
as it is now: ``amount`` is the bid that beat theirs, ``next_min`` and ``ends_at`` the
current ones; it is sent only while the auction runs and their best bid is not leading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from checkout.auction_rules import bands_of, min_next
from realtime.private import Current

__all__ = ["RecentAuctionEvents"]

WON_RANK = 2**62       # above any bid amount (MAX_PRICE is far below)
OFFER_RANK = 2**62 + 1


class RecentAuctionEvents:
    """The current private auction events of users (see the module docstring)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def key(self, event: str, data: dict[str, Any]) -> tuple[str, int] | None:
        auction_id = data.get("auction_id")
        if not isinstance(auction_id, int):
            return None
        if event == "auction.outbid":
            amount = data.get("your_amount")
            return (f"auction:{auction_id}", amount) if isinstance(amount, int) else None
        if event == "auction.won":
            return f"auction:{auction_id}", WON_RANK
        if event == "auction.offer":
            return f"auction:{auction_id}", OFFER_RANK
        return None

    async def current(self, user_ids: Sequence[str], since: float) -> list[Current]:
        users, since_ms = list(user_ids), int(since * 1000)
        found = [*await self._outbid(users, since_ms), *await self._holds(users, since_ms)]
        found.sort(key=lambda c: c.changed_at)
        return found

    async def _outbid(self, users: list[str], since_ms: int) -> list[Current]:
        rows = await self.db.fetch(
            """WITH mine AS (
                   SELECT DISTINCT ON (b.auction_id, b.user_id) b.auction_id, b.user_id,
                          b.amount, b.seq
                   FROM auction_bids b JOIN auctions a ON a.id = b.auction_id
                   WHERE b.user_id = ANY($1::text[]) AND a.state = 'running'
                   ORDER BY b.auction_id, b.user_id, b.amount DESC)
               SELECT m.user_id, m.auction_id, m.amount AS your_amount,
                      beat.amount, beat.at_ms, lead.amount AS leading,
                      lead.ends_at_ms, a.increments, a.start_price
               FROM mine m JOIN auctions a ON a.id = m.auction_id
               JOIN LATERAL (SELECT amount, at_ms FROM auction_bids
                             WHERE auction_id = m.auction_id AND seq > m.seq
                             ORDER BY seq LIMIT 1) beat ON true
               JOIN LATERAL (SELECT amount, ends_at_ms FROM auction_bids
                             WHERE auction_id = m.auction_id
                             ORDER BY seq DESC LIMIT 1) lead ON true
               WHERE beat.at_ms >= $2""", users, since_ms)
        return [Current(r["user_id"], "auction.outbid", {
            "auction_id": r["auction_id"], "amount": r["amount"],
            "your_amount": r["your_amount"],
            "next_min": min_next(bands_of(r["increments"]), r["start_price"], r["leading"]),
            "ends_at": r["ends_at_ms"], "server_time": r["at_ms"]}, r["at_ms"] / 1000)
            for r in rows]

    async def _holds(self, users: list[str], since_ms: int) -> list[Current]:
        """``auction.won`` of the winners, ``auction.offer`` of second-chance bidders."""
        rows = await self.db.fetch(
            """SELECT a.id AS auction_id, o.user_id, o.public_id, o.product_id,
                      o.buyer_number, o.amount, o.currency, o.payment_flow,
                      (extract(epoch FROM o.hold_expires_at) * 1000)::bigint AS expires_at,
                      (extract(epoch FROM o.created_at) * 1000)::bigint AS at_ms,
                      o.public_id = a.offer_hold_id AS offer
               FROM auctions a JOIN orders o
                 ON o.public_id = a.hold_id OR o.public_id = a.offer_hold_id
               WHERE a.state = 'closed' AND o.user_id = ANY($1::text[])
                 AND o.created_at >= to_timestamp($2::float8 / 1000)""", users, since_ms)
        return [Current(r["user_id"], "auction.offer" if r["offer"] else "auction.won", {
            "auction_id": r["auction_id"], "hold_id": r["public_id"],
            "order_id": r["public_id"], "product_id": r["product_id"],
            "buyer_number": r["buyer_number"], "expires_at": r["expires_at"],
            "amount": r["amount"], "currency": r["currency"].strip(),
            "flow": r["payment_flow"]}, r["at_ms"] / 1000) for r in rows]
