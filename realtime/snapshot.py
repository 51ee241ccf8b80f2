"""What a viewer sees on joining a drop: one function, briefly cached per process.

``build(app, drop_id)`` returns the drop's state, products with price and remaining
stock, countdown target, pinned and selling product, recent chat, the pinned chat
message and the stream
position ``pos`` it was taken at. The position is read *before* the data, so every
event after ``pos`` is at least as new as the snapshot; the gateway sends those
events after it (see realtime.gateway). A per-process cache (about a second, and
dropped on every durable event of the drop) keeps 50k joins from reaching
PostgreSQL 50k times.

Remaining stock comes from ``checkout.inventory.remaining(redis, drop_id)`` (and
``variants_remaining`` for each variant of a product that has them); a product it
does not know yet (before pre-warm) shows its units from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack

from realtime import channels, history

__all__ = ["SnapshotCache", "build", "load_drop"]

CACHE_SECONDS = 1.0

_DROP_SQL = """
SELECT id, creator_id, title, description, kind, state, currency, starts_at,
       pinned_product_id, selling_product_id, campaign_goal_orders, campaign_deadline,
       campaign_outcome,
       (SELECT u.display_name FROM users u WHERE u.id = drops.creator_id) AS host_name,
       (SELECT u.avatar_url FROM users u WHERE u.id = drops.creator_id) AS host_avatar_url
FROM drops WHERE id = $1
"""
_PRODUCTS_SQL = """
SELECT dp.product_id, p.title, p.description, p.image_url, dp.price, dp.units,
       dp.per_buyer_limit, dp.state, dp.position
FROM drop_products dp JOIN products p ON p.id = dp.product_id
WHERE dp.drop_id = $1 ORDER BY dp.position, dp.product_id
"""
_VARIANTS_SQL = """
SELECT id AS variant_id, product_id, title, options::text AS options, image_url, price,
       units, per_buyer_limit
FROM drop_product_variants WHERE drop_id = $1 ORDER BY product_id, position, id
"""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def load_drop(db: Any, drop_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(_DROP_SQL, drop_id)
    return dict(row) if row is not None else None


async def _remaining(redis: Any, drop_id: int) -> dict[int, int]:
    try:
        from checkout import inventory
    except ImportError:  # the checkout package is optional for the gateway
        return {}
    try:
        stock = await inventory.remaining(redis, drop_id)
    except Exception:
        return {}
    return {int(k): int(v) for k, v in (stock or {}).items()}


async def _variants(state: Any, drop_id: int) -> dict[int, list[dict[str, Any]]]:
    """The variants of the drop's products with what is left of each (Redis, once
    loaded; before that their units)."""
    rows = await state.db.fetch(_VARIANTS_SQL, drop_id)
    if not rows:
        return {}
    left: dict[int, dict[int, int]] = {}
    try:
        from checkout import inventory

        left = await inventory.variants_remaining(state.redis, drop_id)
    except Exception:  # the checkout package is optional for the gateway
        left = {}
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        pid, vid = row["product_id"], row["variant_id"]
        out.setdefault(pid, []).append({
            "variant_id": vid, "title": row["title"], "options": json.loads(row["options"]),
            "image_url": row["image_url"], "price": row["price"], "units": row["units"],
            "per_buyer_limit": row["per_buyer_limit"],
            "remaining": left.get(pid, {}).get(vid, row["units"])})
    return out


async def recent_chat(redis: Any, drop_id: int, count: int) -> list[dict[str, Any]]:
    if count <= 0:
        return []
    raw = await redis.lrange(channels.chat_key(drop_id, "recent"), 0, count - 1)
    out = []
    for item in reversed(raw):  # LPUSH keeps newest first; send oldest first
        try:
            out.append(msgpack.unpackb(item, raw=False))
        except Exception:
            continue
    return out


async def build(app: Any, drop_id: int) -> dict[str, Any] | None:
    """A fresh snapshot of ``drop_id``, or None when there is no such drop."""
    state = app.state
    redis = state.redis
    pos = await history.position(redis, drop_id)
    drop = await load_drop(state.db, drop_id)
    if drop is None:
        return None
    rows, stock, chat, variants = await asyncio.gather(
        state.db.fetch(_PRODUCTS_SQL, drop_id),
        _remaining(redis, drop_id),
        recent_chat(redis, drop_id, state.settings.chat_history),
        _variants(state, drop_id),
    )
    products = []
    for row in rows:
        pid = row["product_id"]
        products.append({
            "product_id": pid, "title": row["title"], "description": row["description"],
            "image_url": row["image_url"], "price": row["price"],
            "currency": drop["currency"].strip(), "units": row["units"],
            "remaining": stock.get(pid, row["units"]),
            "per_buyer_limit": row["per_buyer_limit"], "state": row["state"],
            "variants": variants.get(pid, []),
        })
    slow, pinned = await asyncio.gather(redis.get(channels.chat_key(drop_id, "slow")),
                                        redis.get(channels.chat_key(drop_id, "pinned")))
    snap: dict[str, Any] = {
        "drop": {
            "id": drop["id"], "creator_id": drop["creator_id"], "title": drop["title"],
            "description": drop["description"], "kind": drop["kind"],
            "state": drop["state"], "currency": drop["currency"].strip(),
            "host": {"id": drop["creator_id"],
                     "name": drop["host_name"] or drop["creator_id"],
                     "avatar_url": drop["host_avatar_url"] or ""},
        },
        "state": drop["state"],
        "countdown": {"starts_at": _iso(drop["starts_at"])},
        "pinned_product_id": drop["pinned_product_id"],
        "selling_product_id": drop["selling_product_id"],
        "products": products,
        "chat": chat,
        "chat_slow_seconds": int(slow or 0),
        "chat_pinned": channels.unpack_map(pinned),
        "viewers": 0,
        "pos": {"epoch": pos.epoch, "offset": pos.offset},
    }
    if drop["kind"] == "campaign":
        snap["campaign"] = {"goal": drop["campaign_goal_orders"],
                            "deadline": _iso(drop["campaign_deadline"]),
                            "outcome": drop["campaign_outcome"]}
    return snap


class SnapshotCache:
    """Per-process cache of :func:`build`, one in-flight build per drop."""

    def __init__(self, app: Any, ttl: float = CACHE_SECONDS) -> None:
        self._app = app
        self._ttl = ttl
        self._entries: dict[int, tuple[float, dict[str, Any] | None]] = {}
        self._building: dict[int, asyncio.Future] = {}
        self.builds = 0

    def invalidate(self, drop_id: int) -> None:
        self._entries.pop(drop_id, None)

    def applied(self, drop_id: int, event: str, data: dict[str, Any], epoch: str,
                offset: int, chat_history: int) -> None:
        """A durable event reached the drop: the cached snapshot is out of date. A chat
        message that directly follows it is added to its chat (a chat storm would
        otherwise rebuild the snapshot, three queries, for every message while
        viewers join); anything else drops it."""
        entry = self._entries.get(drop_id)
        if entry is None:
            return
        expires, snap = entry
        if snap is None:
            return
        pos = snap["pos"]
        if pos["epoch"] == epoch and offset <= pos["offset"]:
            return  # the snapshot was read after this event: it has it
        if event != "chat.message" or pos["epoch"] != epoch or offset != pos["offset"] + 1:
            self.invalidate(drop_id)
            return
        # A new dict with new values: joined frames already built keep theirs.
        chat = [*snap["chat"], data][-max(chat_history, 0):] if chat_history > 0 else []
        self._entries[drop_id] = (expires, {**snap, "chat": chat,
                                            "pos": {"epoch": epoch, "offset": offset}})

    async def get(self, drop_id: int, *, fresh: bool = False) -> dict[str, Any] | None:
        now = time.monotonic()
        if not fresh:
            entry = self._entries.get(drop_id)
            if entry is not None and entry[0] > now:
                return entry[1]
            inflight = self._building.get(drop_id)
            if inflight is not None:
                return await asyncio.shield(inflight)
        fut = asyncio.get_running_loop().create_future()
        self._building[drop_id] = fut
        try:
            snap = await build(self._app, drop_id)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved; waiters re-raise it
            raise
        finally:
            if self._building.get(drop_id) is fut:
                del self._building[drop_id]
        self.builds += 1
        self._entries[drop_id] = (time.monotonic() + self._ttl, snap)
        fut.set_result(snap)
        return snap
