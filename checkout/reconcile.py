"""The reconciler: Redis' holds and counters compared with PostgreSQL, and repaired.

PostgreSQL is the source of truth; Redis must agree with it on what is left to sell.
After a fault (an outage, a lost write, a crash between two steps) they can part, and
nothing else would bring them back together before the holds expire. Every
``DROPSERVER_RECONCILE_INTERVAL`` seconds each process takes, per live drop loaded in
Redis, the drop's lock ``{drop:D}:reconcile`` (one process per drop and round), and:

1. reads Redis: the order stream's entries not yet acknowledged (pending, or not yet
   read by the payments workers), every hold of the drop, the products' counters;
2. reads PostgreSQL the way recovery does, and computes what Redis should hold with
   recovery's own :func:`checkout.recovery.plan` (the same rules as a rebuild);
3. compares each hold, **skipping every hold whose stream entry is still in flight**
   (its order row is on its way, or the worker is waiting out an outage: nothing is
   "repaired" that is simply not recorded yet), and repairs:

   ============================================  ==========================================
   Redis                    PostgreSQL           repair (metric ``kind``)
   ============================================  ==========================================
   a hold                   no order             a ``reserve`` entry again from the hold's
                                                 record: the worker records the order
                                                 (``order_requeued``)
   held or paid             released             the hold released, units back
                                                 (``hold_released``)
   held                     paid / authorized    the hold marked paid (``hold_paid``)
   paid                     held / pending       a ``reserve`` entry again: the worker
                                                 reads the intent (``order_requeued``)
   held                     held, no payment     a ``reserve`` entry again: the worker
                                                 makes the intent (``order_requeued``;
                                                 its entry went with a Redis loss)
   released                 units still held     a ``release`` entry again: the worker
                            or paid              cancels or refunds (``release_requeued``)
   missing                  units held or paid   the hold restored, units taken
                                                 (``hold_restored``); no stock left: an
                                                 open order gets a ``release`` entry
                                                 (``failed``, ``hold_lost``), a paid one
                                                 is restored anyway and reported
                                                 (``oversold``, an error)
   ============================================  ==========================================

4. when the drop was quiet while it read (no entry in flight, the stream's length and
   every buyer counter unchanged from before the PostgreSQL read to after it) and no
   hold needed a repair, recomputes each product's ``remaining``, units per buyer and
   open holds per buyer (and each variant's ``remaining`` and units per buyer) from its
   holds (which now agree with PostgreSQL) and sets
   them if they differ (``counters``), in one script that reads every hold and
   writes nothing if a hold was made meanwhile. (Not from PostgreSQL directly: a
   payment marked paid in Redis a moment before PostgreSQL records it moves the open
   holds without moving the stream.)

Every repair is one atomic script or one stream entry, counted by
``dropserver_reconcile_repairs_total{kind}`` and logged ("reconciler repaired"
with the drop, hold, kind and what was found). Anything that touches PostgreSQL,
money or the buyer is handed to the order worker as a stream entry (``source:
reconcile``), which does it with its usual idempotent steps. The buyer counter itself
is recovery's job (:func:`checkout.recovery.find_behind` rebuilds a drop whose Redis is
behind); drops being rebuilt, or not loaded, are skipped.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from checkout import keys, recovery
from checkout.holds import KEEP_RELEASED_MS
from checkout.order_entries import BadEntry, parse_entry
from checkout.scripts import script
from dropserver.background import Periodic

__all__ = ["REPAIRS", "DropReport", "Reconciler", "reconcile_drop"]

log = logging.getLogger("dropserver.checkout")

REPAIRS = Counter("dropserver_reconcile_repairs_total",
                  "Divergences between Redis and PostgreSQL the reconciler repaired",
                  ["kind"])
LOCK_MS = 30_000
GROUP = "orders"  # the payments workers' consumer group (checkout/order_worker.py)
_COUNTED = ("held", "paid")


@dataclass
class DropReport:
    """What one reconciliation of a drop found and did."""

    drop_id: int
    checked: bool = False
    in_flight: int = 0
    repairs: list[tuple[str, str]] = field(default_factory=list)  # (kind, hold or product)
    skipped: str = ""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _class(state: str | None) -> str:
    if state is None:
        return "missing"
    return state if state in _COUNTED else "released"


async def _in_flight(redis: Redis, stream: str) -> set[str]:
    """Hold ids of the stream's entries the payments workers have not acknowledged."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream yet
        return set()
    group = next((g for g in groups if _s(g["name"]) == GROUP), None)
    if group is None:
        entries = await redis.xrange(stream)  # nobody has read any of them
    else:
        last = _s(group["last-delivered-id"])
        entries = await redis.xrange(stream, min=f"({last}") if last != "0-0" else \
            await redis.xrange(stream)
        if int(group["pending"]):
            rows = await redis.xpending_range(stream, GROUP, min="-", max="+",
                                              count=int(group["pending"]))
            for row in rows:
                eid = row["message_id"]
                entries += await redis.xrange(stream, min=eid, max=eid)
    return {_s(f.get(b"hold_id") or f.get("hold_id") or b"") for _id, f in entries}


async def _redis_holds(redis: Redis, drop_id: int) -> dict[str, dict[str, str]]:
    names = [k async for k in redis.scan_iter(match=f"{keys.tag(drop_id)}:hold:*",
                                              count=1000)]
    if not names:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        values = await pipe.execute()
    out = {}
    for name, raw in zip(names, values, strict=True):
        if raw:
            out[_s(name).rsplit(":", 1)[1]] = {_s(k): _s(v) for k, v in raw.items()}
    return out


async def _marks(redis: Redis, drop_id: int, product_ids: Iterable[int]) -> tuple:
    """The stream's length and each product's buyer counter: they move with every buy
    and every release, so equal marks before and after a read mean nothing moved."""
    async with redis.pipeline(transaction=True) as tx:
        tx.xlen(keys.orders(drop_id))
        for pid in product_ids:
            tx.hget(keys.product(drop_id, pid), "buyers")
        answers = await tx.execute()
    return tuple(_s(a) if a is not None else "0" for a in answers)


async def _requeue(redis: Redis, drop_id: int, fields: dict[str, Any]) -> None:
    await redis.xadd(keys.orders(drop_id), {**{k: str(v) for k, v in fields.items()},
                                            "source": "reconcile"})


def _reserve_fields(record: dict[str, Any]) -> dict[str, Any]:
    names = ("hold_id", "drop_id", "product_id", "user_id", "quantity", "buyer_number",
             "unit_price", "amount", "currency", "idempotency_key", "expires_at", "flow",
             "variant_id")
    return {"type": "reserve", **{n: record[n] for n in names if n in record}}


async def reconcile_drop(db: asyncpg.Pool, redis: Redis, drop_id: int) -> DropReport:
    """One reconciliation of one drop (see the module docstring)."""
    report = DropReport(drop_id)
    if not await recovery.is_loaded(redis, drop_id):
        report.skipped = "not loaded"
        return report
    if await redis.exists(keys.rebuild_lock(drop_id)):
        report.skipped = "rebuilding"
        return report
    token = secrets.token_hex(8)
    lock = keys.reconcile_lock(drop_id)
    if not await redis.set(lock, token, nx=True, px=LOCK_MS):
        report.skipped = "another process is at it"
        return report
    try:
        await _reconcile(db, redis, drop_id, report)
    finally:
        if await redis.get(lock) == token.encode():
            await redis.delete(lock)
    return report


async def _reconcile(db: asyncpg.Pool, redis: Redis, drop_id: int,
                     report: DropReport) -> None:
    pids = sorted(int(p) for p in await redis.smembers(keys.products(drop_id)))
    before = await _marks(redis, drop_id, pids)
    flying = await _in_flight(redis, keys.orders(drop_id))
    held = await _redis_holds(redis, drop_id)
    found = await recovery._read(db, drop_id)
    unpaid = {r["public_id"] for r in await db.fetch(
        "SELECT o.public_id FROM orders o LEFT JOIN payments p ON p.order_id = o.id "
        "WHERE o.drop_id = $1 AND o.state = 'held' AND p.id IS NULL", drop_id)}
    after = await _marks(redis, drop_id, pids)
    if found is None:
        report.skipped = "not live in PostgreSQL"
        return
    drop, products, orders = found
    plan = recovery.plan(drop_id, drop, products, orders)
    report.checked = True
    report.in_flight = len(flying)

    async def repair(kind: str, what: str, **details: Any) -> None:
        REPAIRS.labels(kind).inc()
        report.repairs.append((kind, what))
        log.warning("reconciler repaired", extra={"drop_id": drop_id, "hold_id": what,
                                                  "kind": kind, **details})

    for hold_id in sorted(set(held) | set(plan["holds"])):
        if hold_id in flying:
            continue
        mine, theirs = held.get(hold_id), plan["holds"].get(hold_id)
        redis_state = mine.get("state") if mine else None
        if theirs is None:
            fields = _reserve_fields(mine or {})
            try:
                parse_entry(fields)
            except BadEntry:  # not a hold record the worker could record
                continue
            await _requeue(redis, drop_id, fields)
            await repair("order_requeued", hold_id, redis=redis_state, postgres=None)
            continue
        want = theirs["state"]  # held, paid, or a released state
        have = _class(redis_state)
        if have == want == "held" and hold_id in unpaid:
            # recorded (by the hold journal, or a worker whose stream entry was lost
            # with Redis) but never processed: no intent, no order.payment
            await _requeue(redis, drop_id, _reserve_fields(theirs))
            await repair("order_requeued", hold_id, redis=redis_state, postgres="held")
            continue
        if have == _class(want) or (have == "missing" and want not in _COUNTED):
            continue
        if have == "released":
            # Redis gave the units back; PostgreSQL still counts them: let the worker
            # record the release (cancel or refund the payment, tell the buyer).
            await _requeue(redis, drop_id, {
                "type": "release", "hold_id": hold_id, "drop_id": drop_id,
                "product_id": theirs["product_id"], "user_id": theirs["user_id"],
                "quantity": theirs["quantity"], "reason": redis_state})
            await repair("release_requeued", hold_id, redis=redis_state, postgres=want)
            continue
        if have == "paid" and want == "held":
            # the worker marked Redis paid and did not get to PostgreSQL: run it again
            await _requeue(redis, drop_id, _reserve_fields(theirs))
            await repair("order_requeued", hold_id, redis=redis_state, postgres=want)
            continue
        force = have == "missing" and want == "paid"
        result = await _set_hold(redis, drop_id, theirs, have, want, force=force)
        status = _s(result[0])
        if status == "ok":
            kind = {"missing": "hold_restored"}.get(have) or (
                "hold_paid" if want == "paid" else "hold_released")
            await repair(kind, hold_id, redis=redis_state, postgres=want,
                         remaining=int(result[1]))
            if force and int(result[1]) < 0:
                await repair("oversold", hold_id, remaining=int(result[1]))
                log.error("reconciler restored a paid hold without stock: oversold",
                          extra={"drop_id": drop_id, "hold_id": hold_id})
        elif status == "no_stock":
            # An open order whose hold Redis lost, and its unit is sold again: the
            # order fails (the worker cancels its intent and tells the buyer).
            await _requeue(redis, drop_id, {
                "type": "release", "hold_id": hold_id, "drop_id": drop_id,
                "product_id": theirs["product_id"], "user_id": theirs["user_id"],
                "quantity": theirs["quantity"], "reason": "failed"})
            await repair("hold_lost", hold_id, redis=None, postgres=want)
    if report.repairs or flying or before != after:
        return
    # Counters follow the holds (each of which now agrees with PostgreSQL): set in one
    # script that reads every hold of the product and writes nothing if a hold was
    # made since they were listed.
    variants = {row["product_id"]: row["variants"].split(",")
                for row in plan["products"] if row.get("variants")}
    for pid in pids:
        prefix = f"{drop_id}-{pid}-"
        names = [keys.hold(drop_id, h) for h in held if h.startswith(prefix)]
        vids = variants.get(pid, [])
        vkeys = [k for v in vids for k in (keys.variant(drop_id, pid, int(v)),
                                           keys.variant_units(drop_id, pid, int(v)))]
        result = await script("reconcile_counters")(
            keys=[keys.product(drop_id, pid), keys.units(drop_id, pid),
                  keys.open_holds(drop_id, pid), *vkeys, *names],
            args=[before[1 + pids.index(pid)], len(vids), *vids], client=redis)
        if _s(result[0]) == "fixed":
            await repair("counters", f"product {pid}", remaining=int(result[1]),
                         expected=int(result[2]))


async def _set_hold(redis: Redis, drop_id: int, record: dict[str, Any], seen: str,
                    target: str, *, force: bool) -> list:
    hold_id, pid = record["hold_id"], int(record["product_id"])
    vkeys = []
    if record.get("variant_id") is not None:
        vid = int(record["variant_id"])
        vkeys = [keys.variant(drop_id, pid, vid), keys.variant_units(drop_id, pid, vid)]
    return await script("reconcile_hold")(
        keys=[keys.hold(drop_id, hold_id), keys.product(drop_id, pid),
              keys.units(drop_id, pid), keys.open_holds(drop_id, pid),
              keys.expiry(drop_id), *vkeys],
        args=[hold_id, seen, target, json.dumps(record), KEEP_RELEASED_MS,
              "1" if force else "0"], client=redis)


class Reconciler:
    """Every ``interval`` s: reconcile each live drop loaded in Redis (every process;
    a drop's lock lets one of them do it each round)."""

    def __init__(self, db: asyncpg.Pool, redis: Redis, interval: float) -> None:
        self.db, self.redis = db, redis
        self._loop = Periodic("checkout-reconciler", interval, self.check, log,
                              "reconciliation")
        self.start, self.stop = self._loop.start, self._loop.stop

    async def check(self) -> list[DropReport]:
        rows = await self.db.fetch("SELECT id FROM drops WHERE state = ANY($1::text[])",
                                   list(recovery.LIVE_DROP_STATES))
        return [await reconcile_drop(self.db, self.redis, r["id"]) for r in rows]
