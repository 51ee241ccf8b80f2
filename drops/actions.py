"""Applying lifecycle actions: row lock, legality, Redis side effects, broadcast.

Every action runs in one PostgreSQL transaction that holds the drop's row lock
(``SELECT ... FOR NO KEY UPDATE``) from the legality check to the commit, so two
concurrent BUY NOW clicks serialise: the second sees ``selling`` and gets 409.
Inside the lock, in this order:

1. :func:`drops.lifecycle.transition` checks the action (409 ``illegal_transition``);
2. the Redis side effect of contract 2 (``checkout.inventory``): prewarm at go-live,
   ``open_sales`` at BUY NOW, ``close_sales`` at close / end;
3. the new state and a ``drop_transitions`` row are written;
4. the events are published (``realtime.publish.publish_many``) -- still under the
   lock, so viewers see transitions in commit order, and BUY NOW only once sales are
   open. All the events of one action (``drop.state`` and ``drop.buy_now``) are one
   publication with consecutive positions, so each viewer gets them as one message;
5. commit. If anything fails before the commit the transaction rolls back and the
   Redis side effects that opened sales are undone (sales closed again).

``mark_sold_out`` / ``mark_back_in_stock`` are the system's actions (no actor): checkout
calls them when the selling product's stock reaches 0 / comes back from released holds.
Both are idempotent: only the first of many concurrent calls transitions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from checkout import inventory, recovery
from drops import store
from drops.lifecycle import (
    EDITABLE,
    PINNABLE,
    Action,
    DropState,
    IllegalTransition,
    ProductState,
    product_transition,
    require_state,
    transition,
)
from drops.spec import DropPatch, DropSpec
from dropserver.auth import Principal, require_drop_owner
from dropserver.errors import ApiError, NotFound, ValidationFailed
from dropserver.outbound import EventType, enqueue
from realtime.publish import publish_many

__all__ = [
    "buy_now",
    "close",
    "create",
    "edit",
    "end",
    "go_live",
    "iso",
    "mark_back_in_stock",
    "mark_settled",
    "mark_sold_out",
    "pin",
    "pool_of",
    "schedule",
    "sell_replay",
]

log = logging.getLogger("dropserver.drops")

TRANSITIONS_TOTAL = Counter(
    "dropserver_drop_transitions_total", "Drop lifecycle transitions applied, by action.",
    ["action"])


def pool_of(app_or_pool: Any) -> asyncpg.Pool:
    """The asyncpg pool of a Starlette app (``app.state.db``), or the pool itself."""
    state = getattr(app_or_pool, "state", None)
    if state is not None and hasattr(state, "db"):
        return state.db
    return app_or_pool


def control_pool_of(app_or_pool: Any) -> asyncpg.Pool:
    """The pool of the creator's lifecycle actions: an app's ``state.db_control``
    (connections no order worker takes), else :func:`pool_of`."""
    state = getattr(app_or_pool, "state", None)
    if state is not None and hasattr(state, "db_control"):
        return state.db_control
    return pool_of(app_or_pool)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z``, as every timestamp in the API and events."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Work:
    conn: asyncpg.Connection
    drop: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    undo: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)   # for logs and metrics

    @property
    def state(self) -> DropState:
        return DropState(self.drop["state"])

    async def products(self) -> dict[int, dict[str, Any]]:
        rows = (await store.load_products(self.conn, [self.drop["id"]]))[self.drop["id"]]
        return {p["product_id"]: p for p in rows}


@contextlib.asynccontextmanager
async def _locked(app_or_pool: Any, redis: Any, drop_id: int,
                  actor: Principal | None) -> AsyncIterator[_Work]:
    """Lock the drop, let the caller act, publish its events, commit (see module doc)."""
    pool = control_pool_of(app_or_pool)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        work: _Work | None = None
        try:
            drop = await store.lock_drop(conn, drop_id)
            if drop is None:
                raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
            if actor is not None:
                require_drop_owner(actor, drop["creator_id"])
            work = _Work(conn, drop)
            yield work
            await publish_many(redis, drop_id, work.events)
            await tx.commit()
            for applied in work.applied:
                TRANSITIONS_TOTAL.labels(applied["action"]).inc()
                log.info("drop transition", extra={"drop_id": drop_id, **applied})
        except BaseException:
            with contextlib.suppress(Exception):
                await tx.rollback()
            for undo in reversed(work.undo if work else []):
                try:
                    await undo()
                except Exception:
                    log.exception("undo after a failed transition failed",
                                  extra={"drop_id": drop_id})
            raise


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(f"Redis is unavailable ({type(exc).__name__}); nothing changed, retry",
                    code="unavailable", status=503, headers={"Retry-After": "1"})


@contextlib.asynccontextmanager
async def _action(app_or_pool: Any, redis: Any, drop_id: int,
                  actor: Principal | None) -> AsyncIterator[_Work]:
    """:func:`_locked`, with a Redis outage answered as 503 (the transaction rolled back)."""
    try:
        async with _locked(app_or_pool, redis, drop_id, actor) as work:
            yield work
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("drop action failed: Redis unavailable",
                    extra={"drop_id": drop_id, "error": str(exc)})
        raise _unavailable(exc) from exc


def _product(products: dict[int, dict[str, Any]], product_id: int) -> dict[str, Any]:
    if product_id not in products:
        raise ValidationFailed(f"product_id {product_id} is not a product of this drop",
                               details={"field": "product_id"})
    return products[product_id]


async def _transition(work: _Work, action: Action, actor: Principal | None,
                      values: dict[str, Any] | None = None,
                      product_id: int | None = None) -> DropState:
    previous = work.state
    new = transition(previous, action)
    work.drop["version"] = await store.record_transition(
        work.conn, work.drop["id"], previous, new,
        actor.user_id if actor else None, values)
    work.drop["state"] = new.value
    state_event: dict[str, Any] = {"state": new.value, "previous": previous.value,
                                   "version": work.drop["version"]}
    if product_id is not None:
        state_event["product_id"] = product_id
    work.events.insert(0, ("drop.state", state_event))
    work.applied.append({"action": action.value, "from": previous.value, "to": new.value,
                         "product_id": product_id,
                         "actor": actor.user_id if actor else None})
    return new


async def _webhook(work: _Work, kind: EventType, drop: dict[str, Any]) -> None:
    """The outbound webhook of a transition, in the transition's own transaction."""
    await enqueue(work.conn, kind, {
        "drop_id": drop["id"], "creator_id": drop["creator_id"], "title": drop["title"],
        "state": drop["state"], "starts_at": iso(drop["starts_at"]),
        "live_at": iso(drop["live_at"])},
        creator_id=drop["creator_id"], drop_id=drop["id"],
        key=f"{kind.value}:{drop['id']}:{drop['version']}")


async def _reload(work: _Work) -> dict[str, Any]:
    drop = await store.load_drop(work.conn, work.drop["id"])
    assert drop is not None
    return drop


# --- creator actions ---------------------------------------------------------------

async def create(app_or_pool: Any, actor: Principal, spec: DropSpec) -> dict[str, Any]:
    """A new draft drop owned by ``actor`` (upserted into ``users`` first)."""
    pool = pool_of(app_or_pool)
    async with pool.acquire() as conn, conn.transaction():
        await store.ensure_user(conn, actor)
        drop_id = await store.create_drop(conn, actor.user_id, spec)
        drop = await store.load_drop(conn, drop_id)
    assert drop is not None
    log.info("drop created", extra={"drop_id": drop_id, "user_id": actor.user_id,
                                    "kind": spec.kind, "products": len(spec.products)})
    return drop


async def edit(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal,
               patch: DropPatch, *, expected_version: int | None = None) -> dict[str, Any]:
    """Update a draft or scheduled drop; a new ``starts_at`` of a scheduled drop is
    broadcast as ``drop.countdown``. With ``expected_version`` (HTTP ``If-Match``) an
    edit made from a stale copy is refused (412 ``version_mismatch``)."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        if expected_version is not None and expected_version != work.drop["version"]:
            raise ApiError(
                f"the drop changed since version {expected_version}; reload and retry",
                code="version_mismatch", status=412,
                details={"expected": expected_version, "current": work.drop["version"]})
        state = require_state(work.state, EDITABLE, "edit")
        values = dict(patch.values)
        if state is DropState.SCHEDULED and "starts_at" in values and values["starts_at"] is None:
            raise ValidationFailed("starts_at cannot be cleared once the drop is scheduled",
                                   details={"field": "starts_at"})
        if patch.products is not None:
            try:
                await store.replace_products(work.conn, drop_id, work.drop["creator_id"],
                                             patch.products)
            except ValueError as exc:
                index, product_id = exc.args
                raise ValidationFailed(
                    f"products[{index}].product_id {product_id} is not a product of this drop",
                    details={"field": f"products[{index}].product_id"}) from None
            pinned = work.drop["pinned_product_id"]
            if pinned is not None and pinned not in await work.products():
                values["pinned_product_id"] = None
        work.drop["version"] = await store.update_drop(work.conn, drop_id, values,
                                                       patch.campaign)
        if state is DropState.SCHEDULED and values.get("starts_at") is not None:
            work.events.append(("drop.countdown", {"starts_at": iso(values["starts_at"])}))
        return await _reload(work)


async def schedule(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal,
                   starts_at: datetime | None, *, now: datetime) -> dict[str, Any]:
    """draft -> scheduled; broadcasts the countdown target (``drop.countdown``)."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        transition(work.state, Action.SCHEDULE)          # 409 before 422
        when = starts_at or work.drop["starts_at"]
        if when is None:
            raise ValidationFailed("starts_at is required: this drop has no start time "
                                   "(send one, or set it with PATCH first)",
                                   details={"field": "starts_at"})
        if when <= now:
            raise ValidationFailed("starts_at must be in the future",
                                   details={"field": "starts_at"})
        await _transition(work, Action.SCHEDULE, actor, {"starts_at": when})
        work.events.append(("drop.countdown", {"starts_at": iso(when)}))
        drop = await _reload(work)
        await _webhook(work, EventType.DROP_SCHEDULED, drop)
        return drop


async def go_live(app_or_pool: Any, redis: Any, drop_id: int,
                  actor: Principal) -> dict[str, Any]:
    """scheduled -> live; pre-warms stock and product data into Redis first."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        transition(work.state, Action.GO_LIVE)
        products = list((await work.products()).values())
        await inventory.prewarm(redis, work.drop, products)
        await _transition(work, Action.GO_LIVE, actor, {"live_at": datetime.now(UTC)})
        drop = await _reload(work)
        await _webhook(work, EventType.DROP_LIVE, drop)
        return drop


async def pin(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal,
              product_id: int | None) -> dict[str, Any]:
    """Pin a product (``None`` unpins): not a transition, legal while on air or counting
    down; broadcasts ``drop.pinned``."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        require_state(work.state, PINNABLE, "pin a product of")
        if product_id is not None:
            _product(await work.products(), product_id)
        work.drop["version"] = await store.update_drop(
            work.conn, drop_id, {"pinned_product_id": product_id})
        work.events.append(("drop.pinned", {"product_id": product_id}))
        return await _reload(work)


class SalesUnavailable(ApiError):
    status = 503
    code = "sales_unavailable"


async def buy_now(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal,
                  product_id: int) -> dict[str, Any]:
    """live / sold_out / closed -> selling: BUY NOW for one product.

    Sales open in Redis before viewers hear ``drop.buy_now``. A previous product that
    sold out is closed (its released units do not go back on sale under the next one).
    """
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        transition(work.state, Action.BUY_NOW)
        products = await work.products()
        product = _product(products, product_id)
        product_transition(product["state"], Action.BUY_NOW, drop_state=work.state,
                           product_id=product_id)
        previous = work.drop["selling_product_id"]
        if previous is not None and products.get(previous, {}).get("state") == "sold_out":
            await inventory.close_sales(redis, drop_id, previous)
            await store.set_product_state(work.conn, drop_id, previous, ProductState.CLOSED)
        remaining = await _open_sales(redis, drop_id, product_id)
        work.undo.append(lambda: inventory.close_sales(redis, drop_id, product_id))
        await _transition(work, Action.BUY_NOW, actor,
                          {"selling_product_id": product_id}, product_id)
        await store.set_product_state(work.conn, drop_id, product_id, ProductState.SELLING,
                                      selling_at=True)
        work.events.append(("drop.buy_now", await _buy_now_data(
            redis, drop_id, product, work.drop["currency"], remaining)))
        return await _reload(work)


async def _open_sales(redis: Any, drop_id: int, product_id: int) -> int:
    """:func:`checkout.inventory.open_sales`; a drop Redis cannot sell yet is 503
    ``sales_unavailable`` (retry)."""
    try:
        return await inventory.open_sales(redis, drop_id, product_id)
    except inventory.InventoryError as exc:
        raise SalesUnavailable(
            f"sales cannot open: {exc}", details={"reason": exc.code},
            headers={"Retry-After": "1"}) from None


async def _buy_now_data(redis: Any, drop_id: int, product: dict[str, Any], currency: str,
                        remaining: int) -> dict[str, Any]:
    """``drop.buy_now``'s data; a product with variants adds each variant (its id,
    title, options, price (null: the product's) and what is left of it), so that a
    page can show its picker at once."""
    data: dict[str, Any] = {"product_id": product["product_id"], "price": product["price"],
                            "currency": currency.strip(), "remaining": remaining}
    if product.get("variants"):
        left = (await inventory.variants_remaining(redis, drop_id)).get(
            product["product_id"], {})
        data["variants"] = [
            {"variant_id": v["variant_id"], "title": v["title"], "options": v["options"],
             "price": v["price"], "remaining": left.get(v["variant_id"], v["units"])}
            for v in product["variants"]]
    return data


async def close(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal,
                product_id: int | None = None) -> dict[str, Any]:
    """selling / sold_out -> closed: stop selling the current product."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        transition(work.state, Action.CLOSE)
        current = work.drop["selling_product_id"]
        if product_id is not None and product_id != current:
            raise IllegalTransition(
                work.state, Action.CLOSE,
                f"product {product_id} is not on sale (product {current} is)",
                product_id=product_id)
        await inventory.close_sales(redis, drop_id, current)
        await _transition(work, Action.CLOSE, actor, None, current)
        await store.set_product_state(work.conn, drop_id, current, ProductState.CLOSED)
        work.events.append(("drop.closed", {"product_id": current}))
        return await _reload(work)


async def end(app_or_pool: Any, redis: Any, drop_id: int, actor: Principal) -> dict[str, Any]:
    """live / selling / sold_out / closed -> ended: every sale closes, off air.
    replay -> ended: the replay's sales close (``ended_at`` stays the live's end)."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        replay = work.state is DropState.REPLAY
        transition(work.state, Action.END)
        await inventory.close_sales(redis, drop_id)
        products = await work.products()
        for pid, product in products.items():
            if product["state"] in ("selling", "sold_out"):
                await store.set_product_state(work.conn, drop_id, pid, ProductState.CLOSED)
        await _transition(work, Action.END, actor,
                          None if replay else {"ended_at": datetime.now(UTC)})
        work.events.append(("drop.ended", {}))
        return await _reload(work)


class NothingToSell(ApiError):
    status = 409
    code = "nothing_to_sell"


async def sell_replay(app_or_pool: Any, redis: Any, drop_id: int,
                      actor: Principal) -> dict[str, Any]:
    """ended -> replay: the products dropped during the live (BUY NOW) that have units
    left go on sale again, all at once, for the replay page; ``end`` closes them.

    Units come from Redis as the live left them (held and paid units stay sold;
    holds still open may be released back onto the replay's sale). A drop whose stock
    is no longer in Redis is rebuilt from PostgreSQL first, never re-loaded from its
    units. Nothing left to sell is 409 ``nothing_to_sell``. Broadcasts ``drop.state``
    and ``drop.replay_sales`` with each product as ``drop.buy_now`` has it."""
    async with _action(app_or_pool, redis, drop_id, actor) as work:
        transition(work.state, Action.SELL_REPLAY)
        products = await work.products()
        loaded = await recovery.is_loaded(redis, drop_id)
        left = (await inventory.remaining(redis, drop_id) if loaded
                else await _left_in_postgres(work.conn, drop_id, products))
        dropped = [p for p in products.values()
                   if p["selling_at"] is not None and left.get(p["product_id"], 0) > 0]
        if not dropped:
            raise NothingToSell(
                "nothing to sell on the replay: no product dropped during the live has "
                "units left", details={"state": work.state.value})
        opened: list[int] = []
        work.undo.append(lambda: _close_each(redis, drop_id, opened))
        items = []
        for product in dropped:
            pid = product["product_id"]
            product_transition(product["state"], Action.SELL_REPLAY, drop_state=work.state,
                               product_id=pid)
            remaining = left[pid]
            if loaded:
                remaining = await _open_sales(redis, drop_id, pid)
                opened.append(pid)
            await store.set_product_state(work.conn, drop_id, pid, ProductState.SELLING)
            items.append(await _buy_now_data(redis, drop_id, product, work.drop["currency"],
                                             remaining))
        await _transition(work, Action.SELL_REPLAY, actor)
        work.events.append(("drop.replay_sales", {"products": items}))
        return await _reload(work)


async def _left_in_postgres(conn: asyncpg.Connection, drop_id: int,
                            products: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Units left per product as PostgreSQL's orders say (held and kept units are
    taken), for a drop whose stock Redis no longer has: the recovery rebuilds Redis
    from the same rows once the drop sells again (``recovery.LIVE_DROP_STATES``)."""
    rows = await conn.fetch(
        "SELECT product_id, state, released, quantity FROM orders WHERE drop_id = $1",
        drop_id)
    taken: dict[int, int] = {}
    for r in rows:
        if recovery.hold_state(r["state"], r["released"]) in ("held", "paid"):
            taken[r["product_id"]] = taken.get(r["product_id"], 0) + r["quantity"]
    return {pid: max(0, p["units"] - taken.get(pid, 0)) for pid, p in products.items()}


async def _close_each(redis: Any, drop_id: int, product_ids: list[int]) -> None:
    for pid in product_ids:
        await inventory.close_sales(redis, drop_id, pid)


# --- system actions (checkout calls these) ---------------------------------------------

async def mark_sold_out(app_or_pool: Any, redis: Any, drop_id: int, product_id: int) -> bool:
    """selling -> sold_out when ``product_id`` (the product under BUY NOW) has 0 left.

    Idempotent and safe to call from every buyer who took the last unit: returns True
    for the one call that transitioned, False when the drop is not selling that
    product any more or Redis still shows units left (a hold was released meanwhile).
    Broadcasts ``drop.state`` and ``drop.sold_out``.
    """
    async with _locked(app_or_pool, redis, drop_id, None) as work:
        if work.state is not DropState.SELLING or work.drop["selling_product_id"] != product_id:
            return False
        left = (await inventory.remaining(redis, drop_id)).get(product_id)
        if left is None or left > 0:
            log.info("sold-out report ignored: units left",
                     extra={"drop_id": drop_id, "product_id": product_id, "remaining": left})
            return False
        await _transition(work, Action.SOLD_OUT, None, None, product_id)
        await store.set_product_state(work.conn, drop_id, product_id, ProductState.SOLD_OUT)
        work.events.append(("drop.sold_out", {"product_id": product_id}))
        return True


async def mark_back_in_stock(app_or_pool: Any, redis: Any, drop_id: int,
                             product_id: int) -> bool:
    """sold_out -> selling when released holds put units of ``product_id`` back on sale.

    Idempotent like :func:`mark_sold_out`; broadcasts ``drop.state`` and ``drop.buy_now``
    with the new remaining count.
    """
    async with _locked(app_or_pool, redis, drop_id, None) as work:
        if (work.state is not DropState.SOLD_OUT
                or work.drop["selling_product_id"] != product_id):
            return False
        left = (await inventory.remaining(redis, drop_id)).get(product_id)
        if not left:
            return False
        product = (await work.products())[product_id]
        await _transition(work, Action.RESTOCK, None, None, product_id)
        await store.set_product_state(work.conn, drop_id, product_id, ProductState.SELLING)
        work.events.append(("drop.buy_now", await _buy_now_data(
            redis, drop_id, product, work.drop["currency"], left)))
        return True


async def mark_settled(app_or_pool: Any, redis: Any, drop_id: int) -> bool:
    """ended -> settled, for settlement after its ledger and payouts are committed.

    Idempotent (call it again after a crash): True for the call that transitioned,
    False when the drop is already settled. Any other state is
    :class:`IllegalTransition` (no settling before the end). Broadcasts ``drop.state``.
    """
    async with _locked(app_or_pool, redis, drop_id, None) as work:
        if work.state is DropState.SETTLED:
            return False
        await _transition(work, Action.SETTLE, None)
        return True
