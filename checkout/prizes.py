"""Prize units: a giveaway winner's zero-price order, made like a buy (``award.lua``).

A product giveaway's prize is a unit of the drop's product, taken from its stock at
the draw: :func:`award` makes the winner a hold that is already settled (there is
nothing to pay) and puts a ``type=reserve`` entry with amount 0 on the drop's order
stream, so the payments worker records the order like any other, skips the
PaymentIntent (:mod:`checkout.orders`) and tells the winner ``order.paid``. Recovery,
the reconciler and the invariants count the unit as sold. Idempotent per giveaway and
rank: the hold id follows from them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from checkout import keys
from checkout.scripts import script

__all__ = ["Award", "award", "prize_hold_id"]


@dataclass(frozen=True, slots=True)
class Award:
    """What :func:`award` did: the hold (and order) id, or why there is none."""

    hold_id: str | None
    remaining: int = 0
    replay: bool = False
    error: str = ""  # not_ready (the drop is not loaded), out_of_stock; not_on_sale
    # is the caller's (drops.giveaway_store.announce: the drop is off air)


def prize_hold_id(drop_id: int, product_id: int, giveaway_id: int, rank: int) -> str:
    """The hold id of a giveaway's prize: a hold id (``<drop>-<product>-<16 hex>``)
    fixed by the giveaway and the rank, so an award repeated after a crash finds it."""
    digest = hashlib.sha256(f"giveaway:{int(giveaway_id)}:{int(rank)}".encode()).hexdigest()
    return f"{int(drop_id)}-{int(product_id)}-{digest[:16]}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def award(call: Any, drop_id: int, product_id: int, user_id: str,
                giveaway_id: int, rank: int) -> Award:
    """Give ``user_id`` one unit of the product at price 0 (``award.lua``, run by
    ``call(script, keys, args)``: the giveaway closer's is the buy path's pipeline,
    which answers only once a replica has the hold, raising
    :class:`~checkout.redis_pipe.NotReplicated` until then)."""
    d, p = int(drop_id), int(product_id)
    hold_id = prize_hold_id(d, p, giveaway_id, rank)
    reply = await call(script("award"),
                       [keys.meta(d), keys.product(d, p), keys.units(d, p), keys.idem(d),
                        keys.hold(d, hold_id), keys.orders(d)],
                       [user_id, hold_id, f"giveaway:{int(giveaway_id)}:{int(rank)}", d, p])
    if _s(reply[0]) == "err":
        return Award(None, error=_s(reply[1]))
    return Award(_s(reply[1]), remaining=int(reply[3]), replay=bool(int(reply[4])))
