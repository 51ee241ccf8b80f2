"""Holds after the buy: expiry, buyer cancel, payment settled, lookup.

Every release goes through ``release.lua``, which checks the hold is still ``held``
before it returns the stock, so a release is atomic and happens once: two nodes
sweeping the same expired hold, or a cancel racing the expiry, return the units once
and write one ``type=release`` entry to the order stream.

Expiry: each drop has a ZSET of hold ids scored by expiry (``{drop:D}:expiry``); the
:class:`Sweeper` runs in every process (a hold outlives the worker that made it) and
releases what is due. ``release.lua`` re-checks the due time against Redis' clock, so
a node with a fast clock cannot release early.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from checkout import keys
from checkout.scripts import script
from dropserver.background import Periodic

__all__ = [
    "Reason",
    "ReleaseResult",
    "Sweeper",
    "get_hold",
    "mark_paid",
    "release",
    "sweep_drop",
]

log = logging.getLogger("dropserver.checkout")

KEEP_RELEASED_MS = 24 * 3600 * 1000  # a released hold answers GET and retries for a day


class Reason(enum.StrEnum):
    EXPIRED = "expired"
    CANCELLED = "cancelled"   # by the buyer
    FAILED = "failed"         # the payment failed (payments worker)


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """What ``release.lua`` did. ``released`` is True for exactly one caller per hold."""

    hold_id: str
    drop_id: int
    product_id: int
    released: bool
    state: str = ""           # the hold's state when not released now (or "not_due")
    error: str = ""           # not_found, not_owner
    remaining: int = 0
    user_id: str = ""
    quantity: int = 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def release(redis: Redis, hold_id: str, reason: Reason | str, *,
                  owner: str = "") -> ReleaseResult:
    """Release a held hold: stock back, a ``type=release`` stream entry. Idempotent.

    ``owner`` (non-empty) must be the hold's buyer (cancel). ``reason`` expired is a
    no-op (``state="not_due"``) until the hold's expiry has passed by Redis' clock."""
    ref = keys.parse_hold_id(hold_id)
    if ref is None:
        return ReleaseResult(hold_id, 0, 0, False, error="not_found")
    d, p = ref.drop_id, ref.product_id
    reply = await script("release")(
        keys=[keys.hold(d, hold_id), keys.product(d, p), keys.units(d, p),
              keys.open_holds(d, p), keys.expiry(d), keys.orders(d), *ref.variant_keys()],
        args=[hold_id, Reason(reason).value, owner, KEEP_RELEASED_MS], client=redis)
    status = _s(reply[0])
    if status == "ok":
        return ReleaseResult(hold_id, d, p, True, state=Reason(reason).value,
                             remaining=int(reply[1]), user_id=_s(reply[2]),
                             quantity=int(reply[4]))
    if status == "noop":
        return ReleaseResult(hold_id, d, p, False, state=_s(reply[1]))
    return ReleaseResult(hold_id, d, p, False, error=_s(reply[1]))


async def mark_paid(redis: Redis, hold_id: str, state: str = "paid") -> str:
    """The payment of a held hold succeeded (or was authorized): it stops expiring and
    its units stay sold. Returns ``"ok"`` or ``"noop"`` (already settled); raises
    :class:`LookupError` when the hold is gone or already released (its stock went
    back: the payment must be cancelled or refunded)."""
    ref = keys.parse_hold_id(hold_id)
    if ref is None:
        raise LookupError("not_found")
    d, p = ref.drop_id, ref.product_id
    reply = await script("settle")(
        keys=[keys.hold(d, hold_id), keys.open_holds(d, p), keys.expiry(d)],
        args=[hold_id, state], client=redis)
    if _s(reply[0]) == "err":
        raise LookupError(_s(reply[1]))
    return _s(reply[0])


_HOLD_INTS = ("drop_id", "product_id", "variant_id", "quantity", "buyer_number",
              "unit_price", "amount", "expires_at", "created_at", "released_at",
              "remaining_after", "variant_remaining_after")


async def get_hold(redis: Redis, hold_id: str) -> dict[str, Any] | None:
    """The hold's record (ints as ints), or None when unknown or long released."""
    ref = keys.parse_hold_id(hold_id)
    if ref is None:
        return None
    raw = await redis.hgetall(keys.hold(ref.drop_id, hold_id))
    if not raw:
        return None
    out: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
    for name in _HOLD_INTS:
        if name in out:
            out[name] = int(out[name])
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


async def sweep_drop(redis: Redis, drop_id: int, *, batch: int = 200) -> list[ReleaseResult]:
    """Release every hold of one drop whose expiry has passed; returns what this call
    released (another node may have released some of them first)."""
    due = await redis.zrangebyscore(keys.expiry(drop_id), "-inf", now_ms(), start=0,
                                    num=batch)
    results = []
    for raw in due:
        result = await release(redis, _s(raw), Reason.EXPIRED)
        if result.error == "not_found":
            # The record is gone (drop cleaned up): drop the stale index entry.
            await redis.zrem(keys.expiry(drop_id), raw)
        if result.released:
            results.append(result)
    return results


OnRelease = Callable[[ReleaseResult], Awaitable[None]]


class Sweeper:
    """Releases expired holds of every active drop, every ``interval`` seconds."""

    def __init__(self, redis: Redis, interval: float, on_release: OnRelease | None = None):
        self.redis = redis
        self.on_release = on_release
        self._loop = Periodic("checkout-hold-sweeper", interval, self.sweep, log, "hold sweep")
        self.start, self.stop = self._loop.start, self._loop.stop

    async def sweep(self) -> list[ReleaseResult]:
        released: list[ReleaseResult] = []
        drops = [int(raw) for raw in await self.redis.smembers(keys.ACTIVE_DROPS)]
        if not drops:
            return released
        # One round trip asks every active drop whether anything is due.
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for drop_id in drops:
                pipe.zrangebyscore(keys.expiry(drop_id), "-inf", now, start=0, num=1)
                pipe.zcard(keys.expiry(drop_id))
                pipe.exists(keys.meta(drop_id))
            answers = await pipe.execute()
        for i, drop_id in enumerate(drops):
            due, pending, loaded = answers[3 * i:3 * i + 3]
            if due:
                released += await sweep_drop(self.redis, drop_id)
            elif not pending and not loaded:
                # Nothing to expire and no stock here any more (cleaned up or lost;
                # recovery adds a rebuilt drop back).
                await self.redis.srem(keys.ACTIVE_DROPS, drop_id)
        for result in released:
            log.info("hold expired", extra={"hold_id": result.hold_id,
                                            "drop_id": result.drop_id,
                                            "user_id": result.user_id})
            if self.on_release is not None:
                try:
                    await self.on_release(result)
                except Exception:
                    log.exception("on_release failed", extra={"hold_id": result.hold_id})
        return released

