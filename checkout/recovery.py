"""Rebuild a drop's Redis state from PostgreSQL after Redis lost it.

PostgreSQL is the source of truth (``drop_products`` and ``orders``); Redis holds hot
copies. When Redis comes back empty (a restart without persistence, a failover that
lost writes) the per-drop marker ``{drop:D}:sale`` ``loaded`` is gone, and:

* ``reserve.lua`` refuses with ``not_ready`` (503, ``Retry-After: 1``) -- nothing is
  sold from a half-known state;
* every process checks every ``DROPSERVER_RECOVERY_INTERVAL`` for drops in a state
  where sales may happen (live, selling, sold_out, closed) whose marker is missing,
  and a refused buy asks for the check at once (:func:`ensure_loaded`);
* one process takes the drop's rebuild lock, waits ``DROPSERVER_RECOVERY_GRACE_MS``
  so order rows in flight land, then writes, in one MULTI/EXEC: per product
  ``remaining = units - units of live orders``, the buyer counter ``max(buyer_number)``,
  per-user units and open holds, every hold with its expiry, the idempotency index,
  and last the marker with a new generation (a product with variants: the same per
  variant, from ``orders.variant_id``; its own counters the sums of its variants'). The
  drop's order stream and any hold
  PostgreSQL does not know go (they describe holds the rebuild does not count). Sales
  resume.
* a failover that lost writes may keep the marker: :func:`find_behind` compares the
  highest persisted buyer number with Redis' counter and forces a rebuild when Redis
  is behind.

What counts (mirrors what Redis did before the loss: stock only returns through
``release.lua``): orders ``held`` and ``payment_pending`` are open holds and expire at
``hold_expires_at``; ``authorized``, ``paid``, ``disputed`` and ``refunded`` keep their
units; ``expired``, ``cancelled`` and ``failed`` gave them back, and so did a
``refunded`` order whose hold had been released first (``orders.released``: a late
payment, refunded).

The window (see docs/topics/checkout.md): a hold Redis granted but the payments worker
had not yet written to ``orders`` vanishes with the stream that carried it. Nothing
PostgreSQL knows is sold twice: the rebuild counts exactly the persisted holds, and
the lost hold's unit is simply on sale again. Its buyer number may be given again
(numbers continue from the highest persisted one). Run Redis with ``appendonly yes``
(``appendfsync everysec``) to make that window one second of writes at most.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.asyncio import Redis

from checkout import keys
from checkout.holds import KEEP_RELEASED_MS
from dropserver.background import Periodic

__all__ = [
    "LIVE_DROP_STATES",
    "RecoveryLoop",
    "ensure_loaded",
    "find_behind",
    "find_unloaded",
    "hold_state",
    "is_loaded",
    "rebuild",
]

log = logging.getLogger("dropserver.checkout")

REBUILDS = Counter("dropserver_checkout_rebuilds_total",
                   "Drops whose Redis state was rebuilt from PostgreSQL")

# Drop states in which a drop's stock must be in Redis: on air, or selling on the
# replay after the live (drops.lifecycle.STOCK_IN_REDIS).
LIVE_DROP_STATES = ("live", "selling", "sold_out", "closed", "replay")
OPEN_ORDER_STATES = ("held", "payment_pending")
KEPT_ORDER_STATES = ("authorized", "paid", "disputed", "refunded")
SELLING_PRODUCT_STATES = ("selling", "sold_out")
LOCK_MS = 30_000


async def is_loaded(redis: Redis, drop_id: int) -> bool:
    return bool(await redis.hexists(keys.meta(drop_id), "loaded"))


async def find_unloaded(db: asyncpg.Pool, redis: Redis) -> list[int]:
    """Drops that should be selling from Redis but are not loaded there."""
    rows = await db.fetch("SELECT id FROM drops WHERE state = ANY($1::text[])",
                          list(LIVE_DROP_STATES))
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    async with redis.pipeline(transaction=False) as pipe:
        for drop_id in ids:
            pipe.hexists(keys.meta(drop_id), "loaded")
        loaded = await pipe.execute()
    return [d for d, ok in zip(ids, loaded, strict=True) if not ok]


async def find_behind(db: asyncpg.Pool, redis: Redis) -> list[int]:
    """Loaded drops whose Redis lost writes PostgreSQL already knows about.

    A failover can promote a replica that missed the last writes while keeping the
    loaded marker. Buyer numbers only grow and PostgreSQL only learns numbers Redis
    issued, so a product whose highest persisted buyer number is above Redis'
    counter (or whose hash is gone) proves the loss."""
    rows = await db.fetch(
        "SELECT o.drop_id, o.product_id, max(o.buyer_number) AS top FROM orders o "
        "JOIN drops d ON d.id = o.drop_id WHERE d.state = ANY($1::text[]) "
        "GROUP BY o.drop_id, o.product_id", list(LIVE_DROP_STATES))
    if not rows:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.hget(keys.product(row["drop_id"], row["product_id"]), "buyers")
            pipe.hexists(keys.meta(row["drop_id"]), "loaded")
        answers = await pipe.execute()
    behind = set()
    for i, row in enumerate(rows):
        buyers, loaded = answers[2 * i], answers[2 * i + 1]
        if loaded and (buyers is None or int(buyers) < row["top"]):
            behind.add(row["drop_id"])
    return sorted(behind)


def _ms(ts: Any) -> int:
    return int(ts.timestamp() * 1000)


async def _read(db: asyncpg.Pool, drop_id: int, *,
                mark: bool = False) -> tuple[Any, list, list] | None:
    """The drop, its products and its orders in one snapshot. ``mark`` (a rebuild):
    first wait for order inserts of the drop in flight (the advisory lock they take
    shared) and record the read in ``drop_rebuilds``, so an order for a hold made
    before this read that lands after it is recorded lost, never counted
    (checkout.orders.insert_orders)."""
    from checkout.order_rows import REBUILD_LOCK_NS, lock_key

    async with db.acquire() as conn:
        if not mark:
            return await _read_on(conn, drop_id)
        await conn.execute("SELECT pg_advisory_lock($1, $2)", REBUILD_LOCK_NS,
                           lock_key(drop_id))
        try:
            if await conn.fetchval("SELECT state FROM drops WHERE id = $1",
                                   drop_id) not in LIVE_DROP_STATES:
                return None
            await conn.execute(
                "INSERT INTO drop_rebuilds (drop_id, read_at_ms) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING", drop_id, int(time.time() * 1000))
            return await _read_on(conn, drop_id)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", REBUILD_LOCK_NS,
                               lock_key(drop_id))


async def _read_on(conn: asyncpg.Connection, drop_id: int) -> tuple[Any, list, list] | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        drop = await conn.fetchrow(
            "SELECT id, state, currency, kind, max_holds_per_user FROM drops WHERE id = $1",
            drop_id)
        if drop is None or drop["state"] not in LIVE_DROP_STATES:
            return None
        products = [dict(r) for r in await conn.fetch(
            "SELECT product_id, price, units, per_buyer_limit, state, selling_at "
            "FROM drop_products WHERE drop_id = $1 ORDER BY position, product_id", drop_id)]
        variants = await conn.fetch(
            "SELECT id AS variant_id, product_id, price, units, per_buyer_limit "
            "FROM drop_product_variants WHERE drop_id = $1 ORDER BY position, id", drop_id)
        orders = await conn.fetch(
            "SELECT public_id, product_id, variant_id, user_id, quantity, buyer_number, "
            "unit_price, amount, currency, idempotency_key, state, released, "
            "hold_expires_at, payment_flow, created_at FROM orders WHERE drop_id = $1",
            drop_id)
    for p in products:
        p["variants"] = [dict(v) for v in variants if v["product_id"] == p["product_id"]]
    return drop, products, list(orders)


def hold_state(state: str, released: str | None) -> str:
    """The Redis hold state (``held``, ``paid`` or why it was released) of an order."""
    if released:
        return released
    if state in OPEN_ORDER_STATES:
        return "held"
    if state in KEPT_ORDER_STATES:
        return "paid"
    return state  # expired, cancelled, failed (rows written before ``released`` existed)


def plan(drop_id: int, drop: Any, products: list, orders: list) -> dict[str, Any]:
    """The Redis contents for one drop, from its PostgreSQL rows (pure)."""
    currency = drop["currency"].strip().lower()
    flow = "manual_capture" if drop["kind"] == "campaign" else "client_confirm"
    sold: dict[int, int] = defaultdict(int)
    vsold: dict[tuple[int, int], int] = defaultdict(int)
    vunits: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    buyers: dict[int, int] = defaultdict(int)
    units: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    open_holds: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    holds: dict[str, dict[str, Any]] = {}
    expiry: dict[str, int] = {}
    idem: dict[str, str] = {}
    for o in orders:
        pid, user = o["product_id"], o["user_id"]
        buyers[pid] = max(buyers[pid], o["buyer_number"])
        redis_state = hold_state(o["state"], o["released"])
        expires_at = _ms(o["hold_expires_at"])
        if redis_state == "held":
            expiry[o["public_id"]] = expires_at
            open_holds[pid][user] += 1
        vid = o.get("variant_id")
        if redis_state in ("held", "paid"):
            sold[pid] += o["quantity"]
            units[pid][user] += o["quantity"]
            if vid is not None:
                vsold[(pid, vid)] += o["quantity"]
                vunits[(pid, vid)][user] += o["quantity"]
        holds[o["public_id"]] = {
            "hold_id": o["public_id"], "drop_id": drop_id, "product_id": pid,
            "user_id": user, "quantity": o["quantity"], "buyer_number": o["buyer_number"],
            "unit_price": o["unit_price"], "amount": o["amount"],
            "currency": o["currency"].strip().lower(),
            "idempotency_key": o["idempotency_key"], "expires_at": expires_at,
            "created_at": _ms(o["created_at"]), "flow": o["payment_flow"],
            "state": redis_state,
        }
        if vid is not None:
            holds[o["public_id"]]["variant_id"] = vid
        idem[f"{user}\n{o['idempotency_key']}"] = o["public_id"]
    product_rows = []
    variant_rows = []
    for p in products:
        pid = p["product_id"]
        state = "selling" if p["state"] in SELLING_PRODUCT_STATES else p["state"]
        row = {"product_id": pid, "price": p["price"], "units": p["units"],
               "limit": p["per_buyer_limit"], "currency": currency, "state": state,
               "remaining": max(0, p["units"] - sold[pid]), "buyers": buyers[pid]}
        mine = [{"product_id": pid, "variant_id": v["variant_id"],
                 "price": p["price"] if v["price"] is None else v["price"],
                 "units": v["units"], "limit": v["per_buyer_limit"] or 0,
                 "remaining": max(0, v["units"] - vsold[(pid, v["variant_id"])])}
                for v in p.get("variants") or ()]
        if mine:
            # As prewarm.lua: the product's units and remaining are its variants'.
            row["units"] = sum(v["units"] for v in mine)
            row["remaining"] = sum(v["remaining"] for v in mine)
            row["variants"] = ",".join(str(v["variant_id"]) for v in mine)
            variant_rows += mine
        if state == "selling" and p["selling_at"] is not None:
            row["opened_at"] = _ms(p["selling_at"])
        product_rows.append(row)
    return {"meta": {"drop_id": drop_id, "currency": currency,
                     "max_holds": drop["max_holds_per_user"], "flow": flow},
            "products": product_rows, "units": units, "open": open_holds,
            "variants": variant_rows, "variant_units": vunits,
            "holds": holds, "expiry": expiry, "idem": idem}


async def _write(redis: Redis, drop_id: int, contents: dict[str, Any]) -> int:
    generation = int(time.time() * 1000)
    d = drop_id
    # Holds Redis still has but PostgreSQL never learned of (a failover that kept
    # some keys): they go with the stream entries that carried them.
    orphans = [k async for k in redis.scan_iter(match=f"{keys.tag(d)}:hold:*", count=1000)
               if k.decode().rsplit(":", 1)[1] not in contents["holds"]]
    # The set of drops the sweepers and order workers look at is one global key: on a
    # Redis Cluster it lives on another slot than the drop's, so it cannot be in the
    # transaction below. Added first: a drop listed but not loaded yet is skipped.
    await redis.sadd(keys.ACTIVE_DROPS, d)
    async with redis.pipeline(transaction=True) as tx:
        # Whatever partial state is there goes first. The order stream too: entries
        # the payments worker has not persisted describe holds PostgreSQL does not
        # know, which this rebuild does not count (docs/topics/checkout.md).
        tx.delete(keys.products(d), keys.idem(d), keys.expiry(d), keys.orders(d))
        if orphans:
            tx.delete(*orphans)
        for p in contents["products"]:
            pid = p["product_id"]
            tx.delete(keys.product(d, pid), keys.units(d, pid), keys.open_holds(d, pid))
            tx.hset(keys.product(d, pid), mapping=p)
            tx.sadd(keys.products(d), pid)
            if contents["units"].get(pid):
                tx.hset(keys.units(d, pid), mapping=dict(contents["units"][pid]))
            if contents["open"].get(pid):
                tx.hset(keys.open_holds(d, pid), mapping=dict(contents["open"][pid]))
        for v in contents.get("variants", ()):
            pid, vid = v["product_id"], v["variant_id"]
            tx.delete(keys.variant(d, pid, vid), keys.variant_units(d, pid, vid))
            tx.hset(keys.variant(d, pid, vid), mapping={
                k: v[k] for k in ("price", "units", "limit", "remaining")})
            if contents["variant_units"].get((pid, vid)):
                tx.hset(keys.variant_units(d, pid, vid),
                        mapping=dict(contents["variant_units"][(pid, vid)]))
        for hold_id, record in contents["holds"].items():
            tx.delete(keys.hold(d, hold_id))
            tx.hset(keys.hold(d, hold_id), mapping=record)
            if record["state"] not in ("held", "paid"):
                tx.pexpire(keys.hold(d, hold_id), KEEP_RELEASED_MS)
        if contents["expiry"]:
            tx.zadd(keys.expiry(d), contents["expiry"])
        if contents["idem"]:
            tx.hset(keys.idem(d), mapping=contents["idem"])
        # Last: the marker that lets reserve.lua sell again.
        tx.hset(keys.meta(d), mapping={**contents["meta"], "loaded": 1,
                                       "generation": generation, "rebuilt": 1})
        await tx.execute()
    return generation


async def rebuild(db: asyncpg.Pool, redis: Redis, drop_id: int, *,
                  grace_ms: int = 1000, force: bool = False) -> bool:
    """Rebuild the drop from PostgreSQL unless it is loaded or another process is at it.

    ``force`` rebuilds a loaded drop (one :func:`find_behind` found): sales stop
    first (the marker goes) and resume when the rebuild is written.
    Returns True when the drop is loaded afterwards (by this call or already)."""
    if not force and await is_loaded(redis, drop_id):
        return True
    token = secrets.token_hex(8)
    lock = keys.rebuild_lock(drop_id)
    if not await redis.set(lock, token, nx=True, px=LOCK_MS):
        return False
    try:
        if force:
            await redis.hdel(keys.meta(drop_id), "loaded")
        elif await is_loaded(redis, drop_id):
            return True
        state = await db.fetchval("SELECT state FROM drops WHERE id = $1", drop_id)
        if state not in LIVE_DROP_STATES:
            return False
        # Order rows the payments worker is writing right now land before we read.
        await asyncio.sleep(grace_ms / 1000)
        found = await _read(db, drop_id, mark=True)
        if found is None:
            return False
        drop, products, orders = found
        contents = plan(drop_id, drop, products, orders)
        generation = await _write(redis, drop_id, contents)
        REBUILDS.inc()
        log.warning("drop rebuilt from PostgreSQL", extra={
            "drop_id": drop_id, "generation": generation, "orders": len(orders),
            "remaining": {p["product_id"]: p["remaining"] for p in contents["products"]}})
        return True
    finally:
        if await redis.get(lock) == token.encode():
            await redis.delete(lock)


async def ensure_loaded(db: asyncpg.Pool, redis: Redis, drop_id: int, *,
                        grace_ms: int = 1000, wait: float = 5.0) -> str:
    """A buy found the drop unloaded: rebuild it, or wait for the process that is.

    Returns ``"loaded"``, ``"not_live"`` (no sales can happen: the drop is not live in
    PostgreSQL) or ``"busy"`` (still rebuilding after ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        if await rebuild(db, redis, drop_id, grace_ms=grace_ms):
            return "loaded"
        if not await redis.exists(keys.rebuild_lock(drop_id)):
            # Nobody is rebuilding and we could not: not a live drop.
            return "loaded" if await is_loaded(redis, drop_id) else "not_live"
        if time.monotonic() >= deadline:
            return "busy"
        await asyncio.sleep(0.05)


class RecoveryLoop:
    """Every ``interval`` s: rebuild live drops missing from Redis (every process)."""

    def __init__(self, db: asyncpg.Pool, redis: Redis, interval: float, grace_ms: int):
        self.db, self.redis = db, redis
        self.grace_ms = grace_ms
        self._loop = Periodic("checkout-recovery", interval, self.check, log, "recovery check")
        self.start, self.stop = self._loop.start, self._loop.stop

    async def check(self) -> list[int]:
        rebuilt = []
        for drop_id in await find_unloaded(self.db, self.redis):
            if await rebuild(self.db, self.redis, drop_id, grace_ms=self.grace_ms):
                rebuilt.append(drop_id)
        for drop_id in await find_behind(self.db, self.redis):
            log.warning("redis is behind postgresql: rebuilding", extra={"drop_id": drop_id})
            if await rebuild(self.db, self.redis, drop_id, grace_ms=self.grace_ms,
                             force=True):
                rebuilt.append(drop_id)
        return rebuilt

