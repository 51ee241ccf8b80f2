"""PostgreSQL access for drops: rows in, plain dicts out (schema.sql is the model).

Functions take an asyncpg connection the caller owns, so they compose inside one
transaction; :mod:`drops.actions` wraps them with the row lock, Redis and broadcast,
and is what other packages call to change a drop's state. This module imports none of
the layers above it.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from drops.lifecycle import DropState, ProductState
from drops.spec import CampaignSpec, DropSpec, ProductSpec, VariantSpec
from dropserver.auth import Principal, Role
from dropserver.errors import ValidationFailed

__all__ = [
    "DROP_COLUMNS",
    "create_drop",
    "ensure_user",
    "list_drops",
    "load_drop",
    "load_products",
    "load_variants",
    "lock_drop",
    "record_transition",
    "replace_products",
    "set_product_state",
    "transitions",
    "update_drop",
]

DROP_COLUMNS = (
    "id, creator_id, title, description, kind, state, currency, starts_at, "
    "pinned_product_id, selling_product_id, max_holds_per_user, campaign_goal_orders, "
    "campaign_deadline, campaign_outcome, version, created_at, updated_at, live_at, ended_at, "
    "(SELECT u.display_name FROM users u WHERE u.id = drops.creator_id) AS host_name, "
    "(SELECT u.avatar_url FROM users u WHERE u.id = drops.creator_id) AS host_avatar_url"
)
_PRODUCT_COLUMNS = (
    "dp.product_id, dp.position, dp.price, dp.units, dp.per_buyer_limit, dp.cogs, dp.state, "
    "dp.selling_at, p.title, p.description, p.image_url"
)
# Columns update_drop may set (never the state: that goes through record_transition).
_UPDATABLE = {"title", "description", "currency", "starts_at", "max_holds_per_user",
              "pinned_product_id", "selling_product_id", "campaign_goal_orders",
              "campaign_deadline", "live_at", "ended_at"}


async def ensure_user(conn: asyncpg.Connection, who: Principal) -> None:
    """Upsert the caller into ``users`` (id = token ``sub``), and ``creators`` for creators."""
    role = who.role.value if who.role else Role.VIEWER.value
    claims = who.claims or {}
    name = claims.get("name") if isinstance(claims.get("name"), str) else None
    picture = claims.get("picture")
    if not (isinstance(picture, str) and len(picture) <= 2000
            and picture.startswith(("https://", "http://"))):
        picture = None
    # The token is authoritative for the role (a viewer promoted to creator is updated),
    # and for the name and picture (OIDC "name", "picture") when it carries them.
    await conn.execute(
        "INSERT INTO users (id, display_name, role, avatar_url) "
        "VALUES ($1, $2, $3, coalesce($5, '')) "
        "ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, "
        "display_name = coalesce($4, users.display_name), "
        "avatar_url = coalesce($5, users.avatar_url) "
        "WHERE users.role IS DISTINCT FROM EXCLUDED.role "
        "OR users.display_name IS DISTINCT FROM coalesce($4, users.display_name) "
        "OR users.avatar_url IS DISTINCT FROM coalesce($5, users.avatar_url)",
        who.user_id, who.name or "", role, name, picture)
    if who.role in (Role.CREATOR, Role.ADMIN):
        await conn.execute("INSERT INTO creators (user_id) VALUES ($1) "
                           "ON CONFLICT (user_id) DO NOTHING", who.user_id)


async def _insert_product(conn: asyncpg.Connection, drop_id: int, creator_id: str,
                          position: int, spec: ProductSpec) -> int:
    product_id = await conn.fetchval(
        "INSERT INTO products (creator_id, title, description, image_url) "
        "VALUES ($1, $2, $3, $4) RETURNING id",
        creator_id, spec.title, spec.description, spec.image_url)
    await conn.execute(
        "INSERT INTO drop_products (drop_id, product_id, position, price, units, "
        "per_buyer_limit, cogs) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        drop_id, product_id, position, spec.price, spec.units, spec.per_buyer_limit, spec.cogs)
    await _replace_variants(conn, drop_id, product_id, spec.variants, index=position)
    return product_id


async def _replace_variants(conn: asyncpg.Connection, drop_id: int, product_id: int,
                            specs: tuple[VariantSpec, ...], *, index: int) -> None:
    """Make the product's variants exactly ``specs`` (ids update, others are new).
    A ``variant_id`` that is not one of this product's is a 422 naming it."""
    current = {r["id"] for r in await conn.fetch(
        "SELECT id FROM drop_product_variants WHERE drop_id = $1 AND product_id = $2",
        drop_id, product_id)}
    for i, v in enumerate(specs):
        if v.variant_id is not None and v.variant_id not in current:
            path = f"products[{index}].variants[{i}].variant_id"
            raise ValidationFailed(f"{path} {v.variant_id} is not a variant of this product",
                                   details={"field": path})
    kept = [v.variant_id for v in specs if v.variant_id is not None]
    await conn.execute(
        "DELETE FROM drop_product_variants WHERE drop_id = $1 AND product_id = $2 "
        "AND NOT (id = ANY($3::bigint[]))", drop_id, product_id, kept)
    # Options are unique per product: clear the kept ones first so that two variants
    # may swap their options in one edit.
    await conn.execute(
        "UPDATE drop_product_variants SET options = jsonb_build_object('', id::text) "
        "WHERE id = ANY($1::bigint[])", kept)
    for position, v in enumerate(specs):
        values = (position, v.title, json.dumps(v.options), v.image_url, v.price, v.units,
                  v.per_buyer_limit)
        if v.variant_id is None:
            await conn.execute(
                "INSERT INTO drop_product_variants (drop_id, product_id, position, title, "
                "options, image_url, price, units, per_buyer_limit) "
                "VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9)",
                drop_id, product_id, *values)
        else:
            await conn.execute(
                "UPDATE drop_product_variants SET position = $2, title = $3, "
                "options = $4::text::jsonb, image_url = $5, price = $6, units = $7, "
                "per_buyer_limit = $8 WHERE id = $1", v.variant_id, *values)


async def create_drop(conn: asyncpg.Connection, creator_id: str, spec: DropSpec) -> int:
    """Insert a draft drop and its products; the caller holds the transaction."""
    campaign = spec.campaign
    drop_id = await conn.fetchval(
        "INSERT INTO drops (creator_id, title, description, kind, currency, starts_at, "
        "max_holds_per_user, campaign_goal_orders, campaign_deadline, campaign_outcome) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        creator_id, spec.title, spec.description, spec.kind, spec.currency, spec.starts_at,
        spec.max_holds_per_user,
        campaign.goal_orders if campaign else None,
        campaign.deadline if campaign else None,
        "pending" if campaign else None)
    for position, product in enumerate(spec.products):
        await _insert_product(conn, drop_id, creator_id, position, product)
    return drop_id


async def replace_products(conn: asyncpg.Connection, drop_id: int, creator_id: str,
                           specs: list[ProductSpec]) -> None:
    """Make the drop's product list exactly ``specs`` (ids update, others are new).

    Raises ``ValueError(index, product_id)`` for the first ``product_id`` not in this drop.
    """
    current = {r["product_id"] for r in await conn.fetch(
        "SELECT product_id FROM drop_products WHERE drop_id = $1", drop_id)}
    for index, spec in enumerate(specs):
        if spec.product_id is not None and spec.product_id not in current:
            raise ValueError(index, spec.product_id)
    kept = [s.product_id for s in specs if s.product_id is not None]
    await conn.execute(
        "DELETE FROM drop_products WHERE drop_id = $1 AND NOT (product_id = ANY($2::bigint[]))",
        drop_id, kept)
    for position, spec in enumerate(specs):
        if spec.product_id is None:
            await _insert_product(conn, drop_id, creator_id, position, spec)
            continue
        await conn.execute(
            "UPDATE products SET title = $2, description = $3, image_url = $4 WHERE id = $1",
            spec.product_id, spec.title, spec.description, spec.image_url)
        await conn.execute(
            "UPDATE drop_products SET position = $3, price = $4, units = $5, "
            "per_buyer_limit = $6, cogs = $7 WHERE drop_id = $1 AND product_id = $2",
            drop_id, spec.product_id, position, spec.price, spec.units,
            spec.per_buyer_limit, spec.cogs)
        await _replace_variants(conn, drop_id, spec.product_id, spec.variants, index=position)


async def update_drop(conn: asyncpg.Connection, drop_id: int, values: dict[str, Any],
                      campaign: CampaignSpec | None = None) -> int:
    """Set columns (not the state), bump ``version``; returns the new version."""
    values = dict(values)
    if campaign is not None:
        values["campaign_goal_orders"] = campaign.goal_orders
        values["campaign_deadline"] = campaign.deadline
    unknown = set(values) - _UPDATABLE
    if unknown:
        raise KeyError(f"not updatable: {sorted(unknown)}")
    names = sorted(values)
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=2))
    return await conn.fetchval(
        f"UPDATE drops SET version = version + 1, updated_at = now(){sets} "
        "WHERE id = $1 RETURNING version", drop_id, *[values[n] for n in names])


async def record_transition(conn: asyncpg.Connection, drop_id: int, previous: DropState,
                            new: DropState, actor_id: str | None,
                            values: dict[str, Any] | None = None) -> int:
    """Set the state (and ``values``), bump ``version``, append to ``drop_transitions``.

    The caller holds the row lock (:func:`lock_drop`) and has checked legality with
    :func:`drops.lifecycle.transition`; the ``state = previous`` guard makes a lost lock
    a loud error rather than a silent double transition.
    """
    values = dict(values or {})
    unknown = set(values) - _UPDATABLE
    if unknown:
        raise KeyError(f"not updatable: {sorted(unknown)}")
    names = sorted(values)
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(names, start=4))
    version = await conn.fetchval(
        f"UPDATE drops SET state = $2, version = version + 1, updated_at = now(){sets} "
        "WHERE id = $1 AND state = $3 RETURNING version",
        drop_id, new.value, previous.value, *[values[n] for n in names])
    if version is None:
        raise RuntimeError(f"drop {drop_id} left state {previous} under our lock")
    await conn.execute(
        "INSERT INTO drop_transitions (drop_id, from_state, to_state, actor_id) "
        "VALUES ($1, $2, $3, $4)", drop_id, previous.value, new.value, actor_id)
    return version


async def set_product_state(conn: asyncpg.Connection, drop_id: int, product_id: int,
                            state: ProductState, *, selling_at: bool = False) -> None:
    extra = ", selling_at = coalesce(selling_at, now())" if selling_at else ""
    await conn.execute(
        f"UPDATE drop_products SET state = $3{extra} WHERE drop_id = $1 AND product_id = $2",
        drop_id, product_id, state.value)


async def lock_drop(conn: asyncpg.Connection, drop_id: int) -> dict[str, Any] | None:
    """The drop row, locked until the transaction ends.

    ``FOR NO KEY UPDATE`` (not ``FOR UPDATE``) so that inserting an order, whose
    foreign key takes ``FOR KEY SHARE`` on this row, is never blocked by a transition.
    """
    row = await conn.fetchrow(
        f"SELECT {DROP_COLUMNS} FROM drops WHERE id = $1 FOR NO KEY UPDATE", drop_id)
    return dict(row) if row else None


async def load_products(conn: asyncpg.Connection | asyncpg.Pool,
                        drop_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    rows = await conn.fetch(
        f"SELECT dp.drop_id, {_PRODUCT_COLUMNS} FROM drop_products dp "
        "JOIN products p ON p.id = dp.product_id "
        "WHERE dp.drop_id = ANY($1::bigint[]) ORDER BY dp.drop_id, dp.position, dp.product_id",
        drop_ids)
    variants = await load_variants(conn, drop_ids)
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in drop_ids}
    for row in rows:
        item = dict(row)
        drop_id = item.pop("drop_id")
        item["variants"] = variants.get((drop_id, item["product_id"]), [])
        out[drop_id].append(item)
    return out


async def load_variants(conn: asyncpg.Connection | asyncpg.Pool, drop_ids: list[int],
                        ) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """The variants of the drops' products, by ``(drop_id, product_id)``, in order;
    ``price`` and ``per_buyer_limit`` are None where the product's apply."""
    rows = await conn.fetch(
        "SELECT id AS variant_id, drop_id, product_id, position, title, options::text AS options, "
        "image_url, "
        "price, units, per_buyer_limit FROM drop_product_variants "
        "WHERE drop_id = ANY($1::bigint[]) ORDER BY drop_id, product_id, position, id",
        drop_ids)
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        item = dict(row)
        item["options"] = json.loads(item["options"])
        out.setdefault((item.pop("drop_id"), item.pop("product_id")), []).append(item)
    return out


async def load_drop(conn: asyncpg.Connection | asyncpg.Pool,
                    drop_id: int) -> dict[str, Any] | None:
    """The drop with its ``products`` list, or None."""
    row = await conn.fetchrow(f"SELECT {DROP_COLUMNS} FROM drops WHERE id = $1", drop_id)
    if row is None:
        return None
    drop = dict(row)
    drop["products"] = (await load_products(conn, [drop_id]))[drop_id]
    return drop


async def list_drops(conn: asyncpg.Connection | asyncpg.Pool, *, creator_id: str | None,
                     states: list[str] | None, before: int | None, limit: int,
                     drafts_of: str | None, all_drafts: bool = False) -> list[dict[str, Any]]:
    """Newest first. Drafts are listed only for their creator (``drafts_of``) or admins."""
    where, args = ["TRUE"], []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if creator_id is not None:
        where.append(f"creator_id = {arg(creator_id)}")
    if states:
        where.append(f"state = ANY({arg(states)}::text[])")
    if before is not None:
        where.append(f"id < {arg(before)}")
    if not all_drafts:
        if drafts_of is None:
            where.append("state <> 'draft'")
        else:
            where.append(f"(state <> 'draft' OR creator_id = {arg(drafts_of)})")
    rows = await conn.fetch(
        f"SELECT {DROP_COLUMNS} FROM drops WHERE {' AND '.join(where)} "
        f"ORDER BY id DESC LIMIT {arg(limit)}", *args)
    drops = [dict(r) for r in rows]
    products = await load_products(conn, [d["id"] for d in drops]) if drops else {}
    for drop in drops:
        drop["products"] = products[drop["id"]]
    return drops


async def transitions(conn: asyncpg.Connection | asyncpg.Pool,
                      drop_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT from_state, to_state, actor_id, at FROM drop_transitions "
        "WHERE drop_id = $1 ORDER BY id", drop_id)
    return [dict(r) for r in rows]

