"""Redis key names of the checkout hot path.

Every key of one drop carries the hash tag ``{drop:<id>}`` so that all of them land in
one Redis Cluster slot and a single Lua script may touch them all (Redis Cluster spec,
"Hash tags"). The exceptions are two global keys, each on a slot of its own on a
cluster and so never in a script or a transaction with a drop's keys:
:data:`ACTIVE_DROPS`, the set of drops the hold sweepers and order workers read with
plain commands, and the dead-letter stream ``orders:dead`` (checkout.dead_letters).
Both are small and written rarely; while the shard holding one fails over, sweeps and
new order-worker rounds wait a few seconds, sales do not.

A product with variants keeps its own counters too: its ``units`` and ``remaining``
are the sums over its variants (every script moves both), its ``units`` hash counts
the buyer's units of every variant (the product's per-buyer limit), and its buyer
numbers and open holds are the product's, whatever the variant.

Layout (D = drop id, P = product id, V = variant id, H = hold id)::

    {drop:D}:sale            HASH  loaded, generation, currency, max_holds, flow
    {drop:D}:products        SET   product ids of the drop
    {drop:D}:p:P             HASH  price, units, limit, currency, state, remaining,
                                   buyers (last buyer number), opened_at (ms),
                                   variants ("V1,V2,..." ; absent: no variants)
    {drop:D}:p:P:units       HASH  user id -> units held or paid (per-buyer limit)
    {drop:D}:p:P:open        HASH  user id -> open holds (max holds per user)
    {drop:D}:p:P:v:V         HASH  one variant: price, units, limit (0: the product's
                                   only), remaining
    {drop:D}:p:P:v:V:units   HASH  user id -> units of the variant held or paid
    {drop:D}:idem            HASH  "<user>\\n<idempotency key>" -> hold id
    {drop:D}:hold:H          HASH  one hold (see docs/topics/checkout.md)
    {drop:D}:expiry          ZSET  hold id scored by its expiry (unix ms)
    {drop:D}:orders          STREAM reserve / release entries for the payments worker
    {drop:D}:rl:u:<user>     HASH  sliding-window buy attempts of one user
    {drop:D}:rl:ip:<ip>      HASH  sliding-window buy attempts of one address
    {drop:D}:rebuild         STRING lock held while recovery rebuilds the drop
    {drop:D}:reconcile       STRING lock held while the reconciler checks the drop
    {drop:D}:told:H:<state>  STRING the buyer was told the order reached <state>
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = [
    "ACTIVE_DROPS",
    "HoldRef",
    "expiry",
    "hold",
    "hold_id_prefix",
    "idem",
    "meta",
    "new_hold_id",
    "open_holds",
    "orders",
    "parse_hold_id",
    "product",
    "products",
    "rate_ip",
    "rate_user",
    "rebuild_lock",
    "reconcile_lock",
    "tag",
    "told",
    "units",
    "variant",
    "variant_units",
]

# Drops whose holds the sweeper of every process looks at (see checkout/holds.py).
ACTIVE_DROPS = "checkout:drops"


def tag(drop_id: int) -> str:
    return f"{{drop:{int(drop_id)}}}"


def meta(drop_id: int) -> str:
    # Not "{drop:D}:meta": the realtime history owns that hash (epoch, offset).
    return f"{tag(drop_id)}:sale"


def products(drop_id: int) -> str:
    return f"{tag(drop_id)}:products"


def product(drop_id: int, product_id: int) -> str:
    return f"{tag(drop_id)}:p:{int(product_id)}"


def units(drop_id: int, product_id: int) -> str:
    return f"{tag(drop_id)}:p:{int(product_id)}:units"


def open_holds(drop_id: int, product_id: int) -> str:
    return f"{tag(drop_id)}:p:{int(product_id)}:open"


def variant(drop_id: int, product_id: int, variant_id: int) -> str:
    return f"{tag(drop_id)}:p:{int(product_id)}:v:{int(variant_id)}"


def variant_units(drop_id: int, product_id: int, variant_id: int) -> str:
    return f"{tag(drop_id)}:p:{int(product_id)}:v:{int(variant_id)}:units"


def idem(drop_id: int) -> str:
    return f"{tag(drop_id)}:idem"


def hold(drop_id: int, hold_id: str) -> str:
    return f"{tag(drop_id)}:hold:{hold_id}"


def expiry(drop_id: int) -> str:
    return f"{tag(drop_id)}:expiry"


def orders(drop_id: int) -> str:
    return f"{tag(drop_id)}:orders"


def rate_user(drop_id: int, user_id: str) -> str:
    return f"{tag(drop_id)}:rl:u:{user_id}"


def rate_ip(drop_id: int, ip: str) -> str:
    return f"{tag(drop_id)}:rl:ip:{ip}"


def rebuild_lock(drop_id: int) -> str:
    return f"{tag(drop_id)}:rebuild"


def reconcile_lock(drop_id: int) -> str:
    return f"{tag(drop_id)}:reconcile"


def told(drop_id: int, hold_id: str, state: str) -> str:
    return f"{tag(drop_id)}:told:{hold_id}:{state}"


# A hold id names its drop, product and variant so any node can find the hold's keys
# from the id alone (GET /v1/holds/{id}, the sweeper): "<drop>-<product>-<16 hex>", or
# "<drop>-<product>-<variant>-<16 hex>" for a hold of a variant.
_HOLD_RE = re.compile(
    r"^([1-9][0-9]{0,17})-([1-9][0-9]{0,17})(?:-([1-9][0-9]{0,17}))?-([0-9a-f]{16})$")


@dataclass(frozen=True, slots=True)
class HoldRef:
    drop_id: int
    product_id: int
    hold_id: str
    variant_id: int | None = None

    def variant_keys(self) -> list[str]:
        """The variant's hash and units hash (none for a product without variants)."""
        if self.variant_id is None:
            return []
        return [variant(self.drop_id, self.product_id, self.variant_id),
                variant_units(self.drop_id, self.product_id, self.variant_id)]


def new_hold_id(drop_id: int, product_id: int, variant_id: int | None = None) -> str:
    # os.urandom: what secrets.token_hex(8) reads, without its three calls around it.
    return hold_id_prefix(drop_id, product_id, variant_id) + os.urandom(8).hex()


def hold_id_prefix(drop_id: int, product_id: int, variant_id: int | None = None) -> str:
    """What every new hold id of this product (or variant) starts with: its random part
    follows (:func:`new_hold_id`)."""
    if variant_id is None:
        return f"{int(drop_id)}-{int(product_id)}-"
    return f"{int(drop_id)}-{int(product_id)}-{int(variant_id)}-"


def parse_hold_id(hold_id: str) -> HoldRef | None:
    """The drop, product and variant a hold id names, or None when it is not one."""
    match = _HOLD_RE.match(hold_id) if isinstance(hold_id, str) else None
    if match is None:
        return None
    variant_id = int(match.group(3)) if match.group(3) else None
    return HoldRef(int(match.group(1)), int(match.group(2)), hold_id, variant_id)
