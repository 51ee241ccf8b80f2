"""A rehearsal's verdict: the orders audited, BUY NOW beside the floor, pass or fail.

:func:`audit` reads the drop's orders from PostgreSQL (once the order queue has caught
up) and the remaining stock from Redis, and counts what must never happen: units sold
above units offered, a buyer number given twice or above the stock, holds that differ
between PostgreSQL and what buyers were told. :func:`compare_floor` puts BUY NOW's
percentiles beside the bare-broadcast floor of the same run (their ratios).
:func:`judge` lists the failures against the targets (docs/loadtest.md): every viewer
joined and saw BUY NOW within the p99 budget, no event lost or out of order, no
oversell, as many holds as the stock allows, and PostgreSQL's orders (the audit)
agreeing with what buyers were told.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtest.rehearse import RehearsalConfig

__all__ = ["audit", "bucket_ms", "compare_chat_floor", "compare_floor", "judge"]


def compare_floor(result: dict[str, Any]) -> None:
    """BUY NOW against the floors of the same run: the ratios of their percentiles,
    ``floor_ratio`` against the bare floor (issue 16's goal) and ``rush_floor_ratio``
    against the rush floor. A rush floor that sold more than its stock fails the run:
    its own figures would be wrong."""
    for name, key in (("floor", "floor_ratio"), ("rush_floor", "rush_floor_ratio")):
        floor = result.get(name) or {}
        if not floor.get("measured"):
            continue
        ratio: dict[str, float | None] = {}
        for pct in ("p50_ms", "p99_ms", "max_ms"):
            ours, bare = result["buy_now"]["latency"].get(pct), floor["latency"].get(pct)
            ratio[pct.removesuffix("_ms")] = round(ours / bare, 2) if ours and bare else None
        result["buy_now"][key] = ratio
    rush = (result.get("rush_floor") or {}).get("rush") or {}
    if rush.get("oversold"):
        result.setdefault("failures", []).append(
            f"the rush floor sold {rush['oversold']} units over its stock")
        result["passed"] = False
    compare_chat_floor(result)


def compare_chat_floor(result: dict[str, Any]) -> None:
    """Chat delivery against the chat floor of the same run: its best interval (the
    lowest p99 among those that delivered every message to every viewer, else among
    all) in ``chat_floor.best``, and the ratios of chat's p50/p99 to it in
    ``chat.chat_floor_ratio`` (``before_p99``: the chat posted before BUY NOW, a storm
    without the rush, as the chat floor's is). A chat floor that delivered more than it
    was sent fails the run: its own figures would be wrong."""
    floor = result.get("chat_floor") or {}
    intervals = [i for i in floor.get("intervals", ()) if i["latency"].get("p99_ms")]
    if not floor.get("measured") or not intervals:
        return
    for i in floor["intervals"]:
        if i["delivered"] > i["expected"]:
            result.setdefault("failures", []).append(
                f"the chat floor ({i['batch_ms']} ms) delivered {i['delivered']} messages "
                f"of {i['expected']} sent x viewers")
            result["passed"] = False
    whole = [i for i in intervals if i["delivered"] == i["expected"]]
    best = min(whole or intervals, key=lambda i: i["latency"]["p99_ms"])
    floor["best"] = {"batch_ms": best["batch_ms"], "complete": bool(whole),
                     "latency": best["latency"]}
    chat = result.get("chat") or {}
    lat = chat.get("latency") or {}
    before = (((chat.get("phases") or {}).get("before") or {}).get("latency") or {})
    ratio: dict[str, float | None] = {}
    for name, ours, pct in (("p50", lat.get("p50_ms"), "p50_ms"),
                            ("p99", lat.get("p99_ms"), "p99_ms"),
                            ("before_p99", before.get("p99_ms"), "p99_ms")):
        bare = best["latency"].get(pct)
        ratio[name] = round(ours / bare, 2) if ours and bare else None
    if chat:
        chat["chat_floor_ratio"] = ratio


def bucket_ms(lat: dict[str, Any]) -> float:
    """The histogram's bucket width (ms) for a latency summary: about 60 buckets."""
    top = lat.get("max_ms") or 100.0
    return max(1.0, round(top / 60.0))


def judge(result: dict[str, Any], cfg: RehearsalConfig) -> list[str]:
    """Pass or fail: everyone saw BUY NOW within the p99 budget, nothing lost, no oversell."""
    fail: list[str] = []
    conn = result["connections"]
    if conn["joined"] < cfg.viewers:
        fail.append(f"only {conn['joined']} of {cfg.viewers} viewers joined")
    seen = result["buy_now"]["seen"] + result["buy_now"]["late_via_snapshot"]
    if seen < conn["joined"]:
        fail.append(f"BUY NOW reached {seen} of {conn['joined']} joined viewers")
    p99 = result["buy_now"]["latency"].get("p99_ms")
    if p99 is None or p99 > cfg.p99_budget_ms:
        fail.append(f"BUY NOW p99 {p99} ms over the {cfg.p99_budget_ms:.0f} ms budget")
    pos = result["positions"]
    if pos["lost"] or pos["out_of_order"] or pos["recovery_failed"] or pos["epoch_changes"]:
        fail.append(f"events lost {pos['lost']}, out of order {pos['out_of_order']}, "
                    f"unrecoverable resumes {pos['recovery_failed']}, "
                    f"epoch changes {pos['epoch_changes']}")
    audit = result["audit"]
    if audit.get("oversold"):
        fail.append(f"OVERSOLD by {audit['oversold']}")
    res = result["reservations"]
    expected = min(cfg.stock, res["sent"])
    if res["held"] != expected:
        fail.append(f"{res['held']} holds told to buyers, expected min(stock, buyers) = "
                    f"{expected}")
    if audit.get("checked") and audit.get("active_orders") != res["held"]:
        fail.append(f"PostgreSQL has {audit.get('active_orders')} active orders, buyers were "
                    f"told {res['held']}")
    if audit.get("checked") and audit.get("mismatched_users"):
        fail.append(f"{audit['mismatched_users']} holds differ between PostgreSQL and replies")
    return fail


async def audit(database_url: str, drop_id: int, product_ids: list[int],
                 reports: list[dict[str, Any]], target: Any) -> dict[str, Any]:
    """Orders in PostgreSQL against stock: units sold never above units offered."""
    if not database_url:
        return {"checked": False, "why": "no database URL for a remote target"}
    import asyncpg

    held_users = {u for r in reports for u in r["held_users"]}
    conn = await asyncpg.connect(database_url)
    try:
        # Holds reach PostgreSQL through the order queue: wait until it has caught up.
        deadline = time.monotonic() + 20
        while True:
            rows = await conn.fetch(
                "SELECT product_id, variant_id, user_id, state, quantity, buyer_number "
                "FROM orders WHERE drop_id = $1", drop_id)
            if len(rows) >= len(held_users) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        units = await conn.fetch(
            "SELECT product_id, units FROM drop_products WHERE drop_id = $1", drop_id)
        variant_units = {r["id"]: r["units"] for r in await conn.fetch(
            "SELECT id, units FROM drop_product_variants WHERE drop_id = $1", drop_id)}
    finally:
        await conn.close()
    active = {"held", "payment_pending", "authorized", "paid"}
    unit_map = {r["product_id"]: r["units"] for r in units}
    sold: Counter[int] = Counter()
    variant_sold: Counter[int] = Counter()
    states: Counter[str] = Counter()
    numbers: Counter[tuple[int, int]] = Counter()
    db_users: set[str] = set()
    for r in rows:
        states[r["state"]] += 1
        numbers[(r["product_id"], r["buyer_number"])] += 1
        if r["state"] in active:
            sold[r["product_id"]] += r["quantity"]
            if r["variant_id"] is not None:
                variant_sold[r["variant_id"]] += r["quantity"]
            db_users.add(r["user_id"])
    oversold = sum(max(0, sold[p] - unit_map.get(p, 0)) for p in unit_map)
    # Per variant too: a variant over its own units is oversold even when its product
    # as a whole is not.
    oversold += sum(max(0, n - variant_units.get(v, 0)) for v, n in variant_sold.items())
    remaining: dict[str, int] = {}
    redis_url = getattr(target, "redis_url", "")
    if redis_url:
        from checkout.inventory import remaining as redis_remaining
        from dropserver.redis_client import connect as connect_redis

        client = connect_redis(redis_url)  # one Redis or a cluster (redis+cluster://)
        try:
            remaining = {str(k): v for k, v in (await redis_remaining(client, drop_id)).items()}
        finally:
            await client.aclose()
    return {
        "checked": True, "units": sum(unit_map.values()),
        "active_orders": sum(sold.values()), "orders_by_state": dict(states),
        "oversold": oversold,
        "variants": {str(v): {"units": u, "active_orders": variant_sold.get(v, 0)}
                     for v, u in sorted(variant_units.items())},
        "duplicate_buyer_numbers": sum(1 for c in numbers.values() if c > 1),
        "buyer_number_above_units": sum(1 for (p, n) in numbers if n > unit_map.get(p, 0)),
        "mismatched_users": len(held_users ^ db_users),
        "redis_remaining": remaining,
    }
