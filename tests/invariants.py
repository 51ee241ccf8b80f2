"""The invariants of a drop after a fault or a race, checked against PostgreSQL, Redis
and the payment gateway. Used by the fault tests and by ``benchmarks/faults.py``.

A test that injects a fault (PostgreSQL stopped, Redis restarted empty, a worker
killed) does not check the answers it happened to get; it waits until the order
pipeline is quiet (:func:`quiesce`) and then checks what must always hold
(:func:`check`, or :func:`violations` for the list):

1. every acknowledged hold has exactly one ``orders`` row (with the buyer and buyer
   number the buyer was told);
2. no product has more units in live orders than it has, and no buyer more than the
   per-buyer limit (bought units: a prize unit counts as held, not as bought);
3. one successful payment per paid order: its ``payments`` row succeeded, and the
   gateway holds exactly one charge with money kept for it (an order of amount 0, a
   giveaway's prize, has no payment at all);
4. money kept equals paid orders: per order and in total, in PostgreSQL
   (``amount_received - amount_refunded``) and at the gateway, and an order that is
   not paid keeps no money;
5. Redis and PostgreSQL agree: remaining stock per product, the buyer counter, each
   buyer's units and open holds, and the state of every hold.

A product with variants is checked per variant too: every order of it names one of
its variants, no variant has more units in live orders than it has, no buyer more than
the variant's own limit, and Redis' remaining and units per buyer of each variant are
PostgreSQL's.

"Units-holding" orders are those whose units are sold or held: ``held``,
``payment_pending``, ``authorized``, ``paid``, ``disputed``, and ``refunded`` unless
the hold had been released first (``orders.released``, set when the hold expired,
was cancelled or failed: a late payment for it was refunded, its units went back).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GatewayPayment",
    "check",
    "fake_gateway_payments",
    "quiesce",
    "stub_payments",
    "violations",
]

OPEN_STATES = ("held", "payment_pending")
KEPT_STATES = ("authorized", "paid", "disputed", "refunded")
RELEASED_STATES = ("expired", "cancelled", "failed")
MONEY_KEPT_STATES = ("paid", "disputed")


@dataclass(frozen=True, slots=True)
class GatewayPayment:
    """One PaymentIntent as the gateway (not PostgreSQL) sees it."""

    intent_id: str
    order_id: str | None          # metadata.order_id: the hold id
    status: str
    received: int
    refunded: int

    @property
    def kept(self) -> int:
        return self.received - self.refunded


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def fake_gateway_payments(redis: Any, prefix: str = "fakepay") -> list[GatewayPayment]:
    """The fake gateway's intents (``checkout.fake_gateway.RedisStore``, what a server
    with ``DROPSERVER_PAYMENT_GATEWAY=fake`` uses)."""
    out = []
    for raw in await redis.hvals(f"{prefix}:intent"):
        pi = json.loads(raw)
        out.append(GatewayPayment(pi["id"], (pi.get("metadata") or {}).get("order_id"),
                                  pi["status"], int(pi.get("amount_received") or 0),
                                  int(pi.get("refunded") or 0)))
    return out


def stub_payments(stub: Any) -> list[GatewayPayment]:
    """The intents of ``tests.stripe_stub.StripeStub`` (refunds live on the charge)."""
    out = []
    for pi in list(stub.intents.values()):
        charge = stub.charges.get(pi.get("latest_charge") or "", {})
        out.append(GatewayPayment(pi["id"], (pi.get("metadata") or {}).get("order_id"),
                                  pi["status"], int(pi.get("amount_received") or 0),
                                  int(charge.get("amount_refunded") or 0)))
    return out


async def quiesce(redis: Any, drop_id: int, *, within: float = 60.0,
                  settle: float = 0.3) -> None:
    """Until the drop's order stream is read and acknowledged to the end by the
    payments workers (group ``orders``: lag 0, nothing pending) and stays so for
    ``settle`` seconds. Raises AssertionError after ``within`` seconds."""
    stream = f"{{drop:{int(drop_id)}}}:orders"
    deadline = time.monotonic() + within
    quiet_since: float | None = None
    last: Any = None
    while True:
        last = await _stream_state(redis, stream)
        if last == "quiet":
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= settle:
                return
        else:
            quiet_since = None
        if time.monotonic() > deadline:
            raise AssertionError(f"order stream {stream} not quiet after {within} s: {last}"
                                 f" ({await _stream_detail(redis, stream)})")
        await asyncio.sleep(0.05)


async def _stream_detail(redis: Any, stream: str) -> str:
    """What the stream and the group say about themselves, for a failure message."""
    try:
        info = await redis.xinfo_stream(stream)
        groups = await redis.xinfo_groups(stream)
        consumers = await redis.xinfo_consumers(stream, "orders")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    keep = ("length", "last-generated-id", "entries-added", "max-deleted-entry-id",
            "recorded-first-entry-id")
    stream_info = {k: _s(info.get(k)) for k in keep if k in info}
    group = [{_s(k): _s(v) for k, v in g.items()} for g in groups]
    who = [{_s(k): _s(v) for k, v in c.items()} for c in consumers]
    return f"stream {stream_info}, groups {group}, consumers {who}"


async def _stream_state(redis: Any, stream: str) -> Any:
    try:
        length = await redis.xlen(stream)
        if length == 0:
            return "quiet"
        groups = await redis.xinfo_groups(stream)
    except Exception as exc:  # Redis away for a moment: not quiet
        return f"{type(exc).__name__}: {exc}"
    for g in groups:
        if _s(g["name"]) == "orders":
            lag = g.get("lag")
            if int(g["pending"]) == 0 and lag is not None and int(lag) == 0:
                return "quiet"
            return {"pending": int(g["pending"]), "lag": lag}
    return {"group": "missing", "entries": length}


async def _redis_drop(redis: Any, drop_id: int) -> dict[str, Any]:
    tag = f"{{drop:{int(drop_id)}}}"
    meta = await redis.hgetall(f"{tag}:sale")
    pids = sorted(int(p) for p in await redis.smembers(f"{tag}:products"))
    products = {}
    for pid in pids:
        raw = await redis.hgetall(f"{tag}:p:{pid}")
        products[pid] = {
            "product": {_s(k): _s(v) for k, v in raw.items()},
            "units": {_s(k): int(v) for k, v in
                      (await redis.hgetall(f"{tag}:p:{pid}:units")).items()},
            "open": {_s(k): int(v) for k, v in
                     (await redis.hgetall(f"{tag}:p:{pid}:open")).items()},
        }
    holds = {}
    async for key in redis.scan_iter(match=f"{tag}:hold:*", count=1000):
        raw = await redis.hgetall(key)
        if raw:
            record = {_s(k): _s(v) for k, v in raw.items()}
            holds[_s(key).rsplit(":", 1)[1]] = record
    return {"loaded": bool(meta.get(b"loaded")), "products": products, "holds": holds}


def _holds_units(order: Mapping[str, Any]) -> bool:
    state = order["state"]
    if state in OPEN_STATES or state in ("authorized", "paid", "disputed"):
        return True
    return state == "refunded" and not order.get("released")


def _redis_class(order: Mapping[str, Any]) -> str:
    """The Redis hold state a PostgreSQL order corresponds to."""
    state = order["state"]
    if state in OPEN_STATES:
        return "held"
    if _holds_units(order):
        return "paid"
    return "released"


async def violations(db: Any, redis: Any, drop_id: int, *,
                     acknowledged: Mapping[str, Mapping[str, Any]] | Iterable[str] = (),
                     payments: list[GatewayPayment] | None = None,
                     redis_checks: bool = True) -> list[str]:
    """Every broken invariant of the drop, as one line each (empty: all hold).

    ``acknowledged``: the hold ids buyers were told they hold, optionally mapped to
    what they were told (``user_id``, ``buyer_number``). ``payments``: the gateway's
    view (:func:`fake_gateway_payments`, :func:`stub_payments`); None skips the
    gateway side. ``redis_checks=False`` skips the Redis comparison (e.g. a drop
    deliberately left unloaded)."""
    out: list[str] = []
    has_released = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
        "WHERE table_name = 'orders' AND column_name = 'released')")
    released_col = "o.released" if has_released else "NULL::text"
    has_variants = await db.fetchval("SELECT to_regclass('drop_product_variants') IS NOT NULL")
    variant_col = "o.variant_id" if has_variants else "NULL::bigint"
    orders = [dict(r) for r in await db.fetch(
        f"""SELECT o.id, o.public_id, o.product_id, {variant_col} AS variant_id, o.user_id,
                   o.quantity, o.buyer_number,
                   o.amount, o.state, {released_col} AS released,
                   p.intent_id, p.status AS pay_status,
                   COALESCE(p.amount_received, 0) AS received,
                   COALESCE(p.amount_refunded, 0) AS refunded
            FROM orders o LEFT JOIN payments p ON p.order_id = o.id
            WHERE o.drop_id = $1 ORDER BY o.id""", drop_id)]
    products = {r["product_id"]: dict(r) for r in await db.fetch(
        "SELECT product_id, units, per_buyer_limit FROM drop_products WHERE drop_id = $1",
        drop_id)}
    by_hold = {o["public_id"]: o for o in orders}

    # 1. every acknowledged hold has exactly one order row
    told: dict[str, Mapping[str, Any]] = (
        {k: v for k, v in acknowledged.items()} if isinstance(acknowledged, Mapping)
        else {h: {} for h in acknowledged})
    for hold_id, what in told.items():
        count = await db.fetchval("SELECT count(*) FROM orders WHERE public_id = $1",
                                  hold_id)
        if count != 1:
            out.append(f"acknowledged hold {hold_id} has {count} order rows")
            continue
        row = by_hold.get(hold_id)
        if row is None:
            out.append(f"acknowledged hold {hold_id} is recorded under another drop")
            continue
        for name in ("user_id", "buyer_number"):
            if name in what and what[name] != row[name]:
                out.append(f"hold {hold_id}: buyer was told {name}={what[name]!r}, "
                           f"the order says {row[name]!r}")

    # 2. units and per-buyer limits
    sold: dict[int, int] = defaultdict(int)
    per_user: dict[tuple[int, str], int] = defaultdict(int)
    bought: dict[tuple[int, str], int] = defaultdict(int)
    open_per_user: dict[tuple[int, str], int] = defaultdict(int)
    for o in orders:
        if _holds_units(o):
            sold[o["product_id"]] += o["quantity"]
            per_user[(o["product_id"], o["user_id"])] += o["quantity"]
            if o["amount"] > 0:
                bought[(o["product_id"], o["user_id"])] += o["quantity"]
        if o["state"] in OPEN_STATES:
            open_per_user[(o["product_id"], o["user_id"])] += 1
    for pid, n in sold.items():
        p = products.get(pid)
        if p is None:
            out.append(f"product {pid}: orders for a product the drop does not have")
        elif n > p["units"]:
            out.append(f"product {pid}: {n} units in live orders, only {p['units']} exist")
    for (pid, user), n in bought.items():
        p = products.get(pid)
        if p is not None and n > p["per_buyer_limit"]:
            out.append(f"product {pid}: buyer {user} holds {n} units, the limit is "
                       f"{p['per_buyer_limit']}")

    variants: dict[int, dict[str, Any]] = {}
    if has_variants:
        variants = {r["variant_id"]: dict(r) for r in await db.fetch(
            "SELECT id AS variant_id, product_id, units, per_buyer_limit "
            "FROM drop_product_variants WHERE drop_id = $1", drop_id)}
        out += _variant_violations(orders, variants)

    # 3. and 4. payments and money, PostgreSQL side
    for o in orders:
        kept = o["received"] - o["refunded"]
        if o["state"] in MONEY_KEPT_STATES and o["amount"] == 0:
            if o["intent_id"] is not None:
                out.append(f"order {o['public_id']} is free but has a payment")
        elif o["state"] in MONEY_KEPT_STATES:
            if o["pay_status"] != "succeeded":
                out.append(f"order {o['public_id']} is {o['state']} but its payment is "
                           f"{o['pay_status']}")
            if kept != o["amount"]:
                out.append(f"order {o['public_id']} is {o['state']} for {o['amount']} but "
                           f"PostgreSQL keeps {kept}")
        elif kept != 0:
            out.append(f"order {o['public_id']} is {o['state']} but PostgreSQL keeps "
                       f"{kept} (received {o['received']}, refunded {o['refunded']})")
        if o["refunded"] > o["received"]:
            out.append(f"order {o['public_id']}: refunded {o['refunded']} > received "
                       f"{o['received']}")
    total_paid = sum(o["amount"] for o in orders if o["state"] in MONEY_KEPT_STATES)
    total_kept_pg = sum(o["received"] - o["refunded"] for o in orders)
    if total_kept_pg != total_paid:
        out.append(f"PostgreSQL keeps {total_kept_pg} in total, paid orders are "
                   f"{total_paid}")

    # 3. and 4., gateway side
    if payments is not None:
        mine = [p for p in payments if p.order_id in by_hold]
        per_order: dict[str, list[GatewayPayment]] = defaultdict(list)
        for p in mine:
            per_order[p.order_id or ""].append(p)
        for hold_id, ps in per_order.items():
            o = by_hold[hold_id]
            keeping = [p for p in ps if p.kept > 0]
            if len(ps) > 1:
                out.append(f"order {hold_id} has {len(ps)} PaymentIntents at the gateway")
            if o["state"] in MONEY_KEPT_STATES:
                if len(keeping) != 1 or keeping[0].kept != o["amount"]:
                    out.append(f"order {hold_id} is {o['state']}: the gateway keeps "
                               f"{[p.kept for p in keeping]}, expected [{o['amount']}]")
                elif keeping[0].intent_id != o["intent_id"]:
                    out.append(f"order {hold_id}: the gateway's charge {keeping[0].intent_id}"
                               f" is not the recorded intent {o['intent_id']}")
            elif keeping:
                out.append(f"order {hold_id} is {o['state']} but the gateway keeps "
                           f"{sum(p.kept for p in keeping)} for it (unrecorded money)")
            for p in ps:
                if p.intent_id == o["intent_id"] and p.refunded != o["refunded"]:
                    out.append(f"order {hold_id}: the gateway refunded {p.refunded}, "
                               f"PostgreSQL records {o['refunded']}")
        for o in orders:
            if (o["state"] in MONEY_KEPT_STATES and o["amount"] > 0
                    and o["public_id"] not in per_order):
                out.append(f"order {o['public_id']} is {o['state']} with no charge at the "
                           f"gateway")
        total_gw = sum(p.kept for p in mine)
        if total_gw != total_paid:
            out.append(f"the gateway keeps {total_gw} for this drop, paid orders are "
                       f"{total_paid}")

    # 5. Redis agrees with PostgreSQL
    if redis_checks:
        out += await _redis_violations(redis, drop_id, orders, products, sold, per_user,
                                       open_per_user)
        if variants:
            out += await _redis_variant_violations(redis, drop_id, orders, variants)
    return out


def _variant_sold(orders: list[dict]) -> tuple[dict[int, int], dict[tuple[int, str], int]]:
    sold: dict[int, int] = defaultdict(int)
    per_user: dict[tuple[int, str], int] = defaultdict(int)
    for o in orders:
        if o["variant_id"] is not None and _holds_units(o):
            sold[o["variant_id"]] += o["quantity"]
            per_user[(o["variant_id"], o["user_id"])] += o["quantity"]
    return sold, per_user


def _variant_violations(orders: list[dict], variants: Mapping[int, dict]) -> list[str]:
    out = []
    with_variants = {v["product_id"] for v in variants.values()}
    for o in orders:
        vid = o["variant_id"]
        if vid is None and o["product_id"] in with_variants:
            out.append(f"order {o['public_id']} of product {o['product_id']} names no "
                       "variant, the product has variants")
        elif vid is not None and variants.get(vid, {}).get("product_id") != o["product_id"]:
            out.append(f"order {o['public_id']} names variant {vid}, not one of product "
                       f"{o['product_id']}")
    sold, per_user = _variant_sold(orders)
    for vid, n in sold.items():
        v = variants.get(vid)
        if v is not None and n > v["units"]:
            out.append(f"variant {vid}: {n} units in live orders, only {v['units']} exist")
    for (vid, user), n in per_user.items():
        v = variants.get(vid)
        if v is not None and v["per_buyer_limit"] and n > v["per_buyer_limit"]:
            out.append(f"variant {vid}: buyer {user} holds {n} units, the limit is "
                       f"{v['per_buyer_limit']}")
    return out


async def _redis_variant_violations(redis: Any, drop_id: int, orders: list[dict],
                                    variants: Mapping[int, dict]) -> list[str]:
    out = []
    tag = f"{{drop:{int(drop_id)}}}"
    sold, per_user = _variant_sold(orders)
    for vid, v in sorted(variants.items()):
        key = f"{tag}:p:{v['product_id']}:v:{vid}"
        remaining = await redis.hget(key, "remaining")
        expected = v["units"] - sold.get(vid, 0)
        if remaining is None or int(remaining) != expected:
            out.append(f"variant {vid}: Redis has {_s(remaining)} remaining, PostgreSQL "
                       f"{expected}")
        units = {_s(k): int(n) for k, n in (await redis.hgetall(f"{key}:units")).items()}
        want = {u: n for (q, u), n in per_user.items() if q == vid and n}
        if units != want:
            out.append(f"variant {vid}: units per buyer differ: Redis {units}, "
                       f"PostgreSQL {want}")
    return out


async def _redis_violations(redis: Any, drop_id: int, orders: list[dict],
                            products: dict[int, dict], sold: Mapping[int, int],
                            per_user: Mapping[tuple[int, str], int],
                            open_per_user: Mapping[tuple[int, str], int]) -> list[str]:
    out: list[str] = []
    r = await _redis_drop(redis, drop_id)
    if not r["loaded"]:
        return [f"drop {drop_id} is not loaded in Redis"]
    top: dict[int, int] = defaultdict(int)
    for o in orders:
        top[o["product_id"]] = max(top[o["product_id"]], o["buyer_number"])
    for pid, p in products.items():
        rp = r["products"].get(pid)
        if rp is None:
            out.append(f"product {pid} missing in Redis")
            continue
        expected = p["units"] - sold.get(pid, 0)
        remaining = int(rp["product"].get("remaining", -1))
        if remaining != expected:
            out.append(f"product {pid}: Redis has {remaining} remaining, PostgreSQL "
                       f"{expected} ({p['units']} units - {sold.get(pid, 0)} in live orders)")
        buyers = int(rp["product"].get("buyers", 0))
        if buyers < top[pid]:
            out.append(f"product {pid}: Redis' buyer counter {buyers} is behind "
                       f"PostgreSQL's {top[pid]}")
        units = {u: n for (q, u), n in per_user.items() if q == pid and n}
        if rp["units"] != units:
            out.append(f"product {pid}: units per buyer differ: Redis {rp['units']}, "
                       f"PostgreSQL {units}")
        opened = {u: n for (q, u), n in open_per_user.items() if q == pid and n}
        if rp["open"] != opened:
            out.append(f"product {pid}: open holds per buyer differ: Redis {rp['open']}, "
                       f"PostgreSQL {opened}")
    by_hold = {o["public_id"]: o for o in orders}
    for o in orders:
        h = r["holds"].get(o["public_id"])
        want = _redis_class(o)
        if h is None:
            if want != "released":
                out.append(f"order {o['public_id']} is {o['state']} but Redis has no hold")
            continue
        got = "held" if h.get("state") == "held" else (
            "paid" if h.get("state") == "paid" else "released")
        if got != want:
            out.append(f"order {o['public_id']} is {o['state']} in PostgreSQL, its hold is "
                       f"{h.get('state')} in Redis")
    for hold_id, h in r["holds"].items():
        if hold_id not in by_hold and h.get("state") in ("held", "paid"):
            out.append(f"Redis counts hold {hold_id} ({h.get('state')}, user "
                       f"{h.get('user_id')}) that PostgreSQL has no order for")
    return out


async def check(db: Any, redis: Any, drop_id: int, **kwargs: Any) -> None:
    """:func:`violations`, raising AssertionError with all of them."""
    found = await violations(db, redis, drop_id, **kwargs)
    if found:
        raise AssertionError(f"{len(found)} invariant(s) broken for drop {drop_id}:\n  "
                             + "\n  ".join(found))


async def fake_drop_violations(env: Mapping[str, Any]) -> list[str]:
    """:func:`violations` of a test's drop on the fake gateway: ``env`` holds its
    ``db``, ``redis``, ``drop_id`` and ``told`` (the holds its buyers were told of)."""
    return await violations(env["db"], env["redis"], env["drop_id"], acknowledged=env["told"],
                            payments=await fake_gateway_payments(env["redis"]))


async def check_fake_drop(env: Mapping[str, Any]) -> None:
    """:func:`check` of a test's drop on the fake gateway (see
    :func:`fake_drop_violations`)."""
    await check(env["db"], env["redis"], env["drop_id"], acknowledged=env["told"],
                payments=await fake_gateway_payments(env["redis"]))
