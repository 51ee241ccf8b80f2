"""Stock of a drop in Redis: load it at go-live, open and close sales, read it.

Contract 2 of the project brief (the drops package calls these):

* :func:`prewarm` when the drop goes live (idempotent, never resets stock sold);
* :func:`open_sales` at BUY NOW (returns the remaining units);
* :func:`close_sales` when the creator stops selling one product or all;
* :func:`remaining` for snapshots (viewer join, the creator dashboard).

PostgreSQL stays the source of truth: after a Redis loss :mod:`checkout.recovery`
rebuilds these keys from the ``drop_products`` and ``orders`` tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from checkout import keys
from checkout.scripts import script

__all__ = ["InventoryError", "close_sales", "open_sales", "prewarm", "remaining",
           "stock_event", "variants_remaining"]


class InventoryError(RuntimeError):
    """Sales cannot open: ``code`` is ``not_prewarmed`` or ``not_ready``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _int(row: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = row.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value
    if default is None:
        raise ValueError(f"missing {' or '.join(names)}")
    return default


def product_spec(row: Mapping[str, Any], currency: str) -> dict[str, Any]:
    """One ``drop_products`` row (or the drops API's dict) as prewarm.lua reads it."""
    spec = {
        "product_id": _int(row, "product_id", "id"),
        "price": _int(row, "price"),
        "units": _int(row, "units"),
        "limit": _int(row, "per_buyer_limit", "limit", default=1),
        "currency": str(row.get("currency") or currency).lower(),
    }
    if spec["product_id"] <= 0 or spec["price"] <= 0 or spec["units"] < 0 or spec["limit"] < 1:
        raise ValueError(f"invalid product for prewarm: {spec}")
    variants = [variant_spec(v, spec["price"]) for v in row.get("variants") or ()]
    if variants:
        # The product's units are its variants' together (prewarm.lua keeps the
        # product's remaining the sum of theirs).
        spec["units"] = sum(v["units"] for v in variants)
        spec["variants"] = variants
    return spec


def variant_spec(row: Mapping[str, Any], product_price: int) -> dict[str, Any]:
    """One ``drop_product_variants`` row as prewarm.lua reads it: the price is the
    variant's own or the product's, a limit of 0 leaves only the product's."""
    price = row.get("price")
    spec = {"variant_id": _int(row, "variant_id", "id"),
            "price": product_price if price is None else _int(row, "price"),
            "units": _int(row, "units"),
            "limit": row.get("per_buyer_limit") or row.get("limit") or 0}
    if spec["variant_id"] <= 0 or spec["price"] <= 0 or spec["units"] < 0:
        raise ValueError(f"invalid variant for prewarm: {spec}")
    return spec


async def prewarm(redis: Redis, drop: Mapping[str, Any], products: Sequence[Mapping]) -> None:
    """Put the drop's products (price, units, per-buyer limit, currency) and its
    ``max_holds_per_user`` into Redis. Idempotent: a second call updates prices and
    limits, and moves stock only by a change of ``units``; units already held or paid
    stay sold. Marks the drop loaded (ready to sell) the first time."""
    drop_id = _int(drop, "id", "drop_id")
    currency = str(drop.get("currency") or "usd").strip().lower()
    specs = [product_spec(p, currency) for p in products]
    payload = {
        "drop_id": drop_id,
        "currency": currency,
        "max_holds": _int(drop, "max_holds_per_user", default=1),
        # Campaign (group-buy) drops authorize now and capture when the goal is met.
        "flow": "manual_capture" if drop.get("kind") == "campaign" else "client_confirm",
        "products": specs,
    }
    key_list = [keys.meta(drop_id), keys.products(drop_id)]
    key_list += [keys.product(drop_id, s["product_id"]) for s in specs]
    key_list += [keys.variant(drop_id, s["product_id"], v["variant_id"])
                 for s in specs for v in s.get("variants", ())]
    await script("prewarm")(keys=key_list, args=[json.dumps(payload)], client=redis)
    await redis.sadd(keys.ACTIVE_DROPS, drop_id)


async def open_sales(redis: Redis, drop_id: int, product_id: int) -> int:
    """BUY NOW for one product: it sells from now on. Returns the remaining units.

    Raises :class:`InventoryError` (``not_prewarmed``) for a product :func:`prewarm`
    never loaded, and (``not_ready``) while recovery rebuilds the drop."""
    try:
        left = await script("open_sales")(
            keys=[keys.meta(drop_id), keys.product(drop_id, product_id)], client=redis)
    except ResponseError as exc:
        text = str(exc)
        for code in ("NOT_PREWARMED", "NOT_READY"):
            if text.startswith(code):
                raise InventoryError(code.lower(), text[len(code):].strip()) from None
        raise
    await redis.sadd(keys.ACTIVE_DROPS, drop_id)
    return int(left)


async def close_sales(redis: Redis, drop_id: int, product_id: int | None = None) -> None:
    """Stop selling one product, or every product of the drop when ``product_id`` is
    None. Open holds stay: they are paid or expire as usual. Idempotent."""
    if product_id is None:
        pids = [int(p) for p in await redis.smembers(keys.products(drop_id))]
    else:
        pids = [int(product_id)]
    if pids:
        await script("close_sales")(keys=[keys.product(drop_id, p) for p in pids],
                                    client=redis)


async def remaining(redis: Redis, drop_id: int) -> dict[int, int]:
    """Units left per product id (held and paid units are not left)."""
    pids = sorted(int(p) for p in await redis.smembers(keys.products(drop_id)))
    if not pids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for pid in pids:
            pipe.hget(keys.product(drop_id, pid), "remaining")
        values = await pipe.execute()
    return {pid: int(v) for pid, v in zip(pids, values, strict=True) if v is not None}


async def _products(redis: Redis, drop_id: int,
                    ) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """Units left per product, and the (product, variant) ids of its variants."""
    pids = sorted(int(p) for p in await redis.smembers(keys.products(drop_id)))
    left: dict[int, int] = {}
    variants: list[tuple[int, int]] = []
    if not pids:
        return left, variants
    async with redis.pipeline(transaction=False) as pipe:
        for pid in pids:
            pipe.hmget(keys.product(drop_id, pid), "remaining", "variants")
        rows = await pipe.execute()
    for pid, (rem, ids) in zip(pids, rows, strict=True):
        if rem is None:
            continue
        left[pid] = int(rem)
        if ids:
            text = ids.decode() if isinstance(ids, bytes) else ids
            variants += [(pid, int(v)) for v in text.split(",") if v]
    return left, variants


async def _variants_left(redis: Redis, drop_id: int, variants: list[tuple[int, int]],
                         ) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    if not variants:
        return out
    async with redis.pipeline(transaction=False) as pipe:
        for pid, vid in variants:
            pipe.hget(keys.variant(drop_id, pid, vid), "remaining")
        values = await pipe.execute()
    for (pid, vid), value in zip(variants, values, strict=True):
        if value is not None:
            out.setdefault(pid, {})[vid] = int(value)
    return out


async def variants_remaining(redis: Redis, drop_id: int) -> dict[int, dict[int, int]]:
    """Units left per variant id, per product id (products with variants only)."""
    _left, variants = await _products(redis, drop_id)
    return await _variants_left(redis, drop_id, variants)


async def stock_event(redis: Redis, drop_id: int) -> dict[str, Any]:
    """The drop's ``stock`` event: units left per product (every variant together) and,
    only when the drop has products with variants, units left per variant (per
    product). Integer ids: each wire format encodes them its own way (JSON turns map
    keys into strings, msgpack keeps integers; docs/protocol.md)."""
    left, variants = await _products(redis, drop_id)
    data: dict[str, Any] = {"products": left}
    if variants:
        by_product = data["variants"] = await _variants_left(redis, drop_id, variants)
        # A product with variants has what they have together (the reserve script moves
        # both at once): taken from the later read, so that a buy landing between the
        # two reads cannot make one event's total disagree with its variants.
        for pid, byv in by_product.items():
            left[pid] = sum(byv.values())
    return data


async def product_state(redis: Redis, drop_id: int, product_id: int) -> dict[str, str]:
    """The product's hash as text (price, units, limit, state, remaining, buyers...)."""
    raw = await redis.hgetall(keys.product(drop_id, product_id))
    return {k.decode(): v.decode() for k, v in raw.items()}
