"""The creator HTTP API for the drop lifecycle (docs/http-api.md, "Drops").

Routes parse and authorise; :mod:`drops.actions` applies the action under the drop's
row lock; :mod:`drops.lifecycle` says what is legal; :mod:`drops.spec` validates input.

Reading is public (drafts only for their creator and admins); every write needs a
creator or admin token (401 without one, 403 ``forbidden_role`` for viewers and
investors) and acts only on the caller's own drops (403 ``not_drop_owner``).

For checkout: ``drops.actions.mark_sold_out(app_or_pool, redis, drop_id, product_id)``
(selling -> sold_out, idempotent) and ``drops.actions.mark_back_in_stock(...)``
(sold_out -> selling after released holds).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import inventory
from drops import actions, store
from drops.lifecycle import STOCK_IN_REDIS, DropState, allowed_actions
from drops.spec import parse_create, parse_patch, parse_product_id, parse_time
from dropserver.auth import Principal, Role, principal, require, require_drop_owner
from dropserver.component import Component
from dropserver.errors import NotFound, ValidationFailed
from dropserver.http import MAX_ID, parse_int, read_json, reject_unknown
from dropserver.observability import bind
from realtime.moderators import guard_sales

__all__ = ["drop_json", "host_json", "part", "snapshot"]



def _now() -> datetime:
    return datetime.now(UTC)


def _drop_id(request: Request) -> int:
    drop_id = request.path_params["drop_id"]  # the ``id`` convertor: 1 <= id < 10^18
    bind(drop_id=drop_id)
    return drop_id


async def _creator(request: Request) -> Principal:
    who = await require(request, Role.CREATOR)
    bind(user_id=who.user_id)
    return who


def host_json(drop: dict[str, Any]) -> dict[str, Any]:
    """Who hosts the drop, as the viewer page shows them: the creator's name and avatar."""
    return {"id": drop["creator_id"], "name": drop.get("host_name") or drop["creator_id"],
            "avatar_url": drop.get("host_avatar_url") or ""}


def _variant_json(v: dict[str, Any], left: dict[int, int] | None) -> dict[str, Any]:
    item = {"variant_id": v["variant_id"], "title": v["title"], "options": v["options"],
            "image_url": v["image_url"], "price": v["price"], "units": v["units"],
            "per_buyer_limit": v["per_buyer_limit"]}
    if left is not None and v["variant_id"] in left:
        item["remaining"] = left[v["variant_id"]]
    return item


def drop_json(drop: dict[str, Any], *, private: bool,
              remaining: dict[int, int] | None = None,
              variants_left: dict[int, dict[int, int]] | None = None) -> dict[str, Any]:
    """The API's view of a drop; ``private`` adds COGS and the legal next actions.
    While on air, ``remaining`` (per product) and ``variants_left`` (per product, per
    variant) add what is left and ``sold`` (units - remaining)."""
    campaign = None
    if drop["kind"] == "campaign":
        campaign = {"goal_orders": drop["campaign_goal_orders"],
                    "deadline": actions.iso(drop["campaign_deadline"]),
                    "outcome": drop["campaign_outcome"]}
    products = []
    for p in drop["products"]:
        item = {
            "product_id": p["product_id"], "title": p["title"],
            "description": p["description"], "image_url": p["image_url"],
            "position": p["position"], "price": p["price"], "units": p["units"],
            "per_buyer_limit": p["per_buyer_limit"], "state": p["state"],
            "selling_at": actions.iso(p["selling_at"]),
        }
        if remaining is not None and p["product_id"] in remaining:
            item["remaining"] = remaining[p["product_id"]]
            item["sold"] = max(0, p["units"] - item["remaining"])
        left = (variants_left or {}).get(p["product_id"]) if remaining is not None else None
        item["variants"] = [_variant_json(v, left) for v in p.get("variants", ())]
        if private:
            item["cogs"] = p["cogs"]
        products.append(item)
    out = {
        "id": drop["id"], "creator_id": drop["creator_id"], "title": drop["title"],
        "description": drop["description"], "kind": drop["kind"], "state": drop["state"],
        "currency": drop["currency"].strip(), "starts_at": actions.iso(drop["starts_at"]),
        "pinned_product_id": drop["pinned_product_id"],
        "selling_product_id": drop["selling_product_id"],
        "max_holds_per_user": drop["max_holds_per_user"], "campaign": campaign,
        "version": drop["version"], "created_at": actions.iso(drop["created_at"]),
        "updated_at": actions.iso(drop["updated_at"]), "live_at": actions.iso(drop["live_at"]),
        "ended_at": actions.iso(drop["ended_at"]), "products": products,
        "host": host_json(drop),
    }
    if private:
        out["allowed_actions"] = [a.value for a in allowed_actions(drop["state"])
                                  if a.value not in ("sold_out", "restock", "settle")]
    return out


def _answer(drop: dict[str, Any], status: int = 200, **headers: str) -> JSONResponse:
    headers["etag"] = f'"{drop["version"]}"'
    return JSONResponse(drop_json(drop, private=True), status_code=status, headers=headers)


def _if_match(request: Request) -> int | None:
    """The version named by ``If-Match: "<version>"`` (RFC 9110 13.1.1), if any."""
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    tag = raw.strip().removeprefix("W/").strip('"')
    try:
        return parse_int(tag, "If-Match")
    except ValidationFailed:
        raise ValidationFailed('If-Match must be the drop\'s ETag, e.g. "3"',
                               details={"field": "If-Match"}) from None


# --- reading -------------------------------------------------------------------------

async def snapshot(app: Any, drop_id: int, who: Principal | None = None) -> dict | None:
    """The drop as ``GET /v1/drops/{id}`` shows it to ``who`` (None: a guest), with the
    remaining units while on air or selling on the replay; None when it does not exist
    or is a draft ``who`` may not see. For the gateway's join reply as much as for the
    endpoint."""
    drop = await store.load_drop(app.state.db, drop_id)
    private = drop is not None and who is not None and who.can_manage(drop["creator_id"])
    if drop is None or (drop["state"] == DropState.DRAFT and not private):
        return None
    remaining = variants_left = None
    if DropState(drop["state"]) in STOCK_IN_REDIS:
        remaining = await inventory.remaining(app.state.redis, drop_id)
        if any(p["variants"] for p in drop["products"]):
            variants_left = await inventory.variants_remaining(app.state.redis, drop_id)
    return drop_json(drop, private=private, remaining=remaining,
                     variants_left=variants_left)


async def get_drop(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    body = await snapshot(request.app, drop_id, await principal(request))
    if body is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    return JSONResponse(body, headers={"etag": f'"{body["version"]}"'})


async def list_drops(request: Request) -> JSONResponse:
    who = await principal(request)
    query = request.query_params
    for name in query:
        if name not in ("creator", "state", "limit", "before"):
            raise ValidationFailed(f"{name} is not a known query parameter",
                                   details={"field": name})
    creator = query.get("creator") or None
    if creator is not None and len(creator) > 128:
        raise ValidationFailed("creator must be at most 128 long", details={"field": "creator"})
    states = None
    if query.get("state"):
        states = [s.strip() for s in query["state"].split(",") if s.strip()]
        bad = [s for s in states if s not in {d.value for d in DropState}]
        if bad:
            raise ValidationFailed(
                f"state {bad[0]!r} is not one of {', '.join(s.value for s in DropState)}",
                details={"field": "state"})

    def number(name: str, default: int | None, low: int, high: int) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        return parse_int(raw, name, low=low, high=high)

    limit = number("limit", 20, 1, 100)
    before = number("before", None, 1, MAX_ID)
    drops = await store.list_drops(
        request.app.state.db, creator_id=creator, states=states, before=before,
        limit=limit, drafts_of=who.user_id, all_drafts=who.role is Role.ADMIN)
    body = {"drops": [drop_json(d, private=who.can_manage(d["creator_id"])) for d in drops],
            "next_before": drops[-1]["id"] if len(drops) == limit else None}
    return JSONResponse(body)


# --- writing -------------------------------------------------------------------------

async def create_drop(request: Request) -> JSONResponse:
    who = await _creator(request)
    spec = parse_create(await read_json(request), now=_now())
    drop = await actions.create(request.app, who, spec)
    return _answer(drop, 201, location=f"/v1/drops/{drop['id']}")


async def update_drop(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    data = await read_json(request)
    kind = await request.app.state.db.fetchval("SELECT kind FROM drops WHERE id = $1", drop_id)
    patch = parse_patch(data, now=_now(), kind=kind or "standard")
    drop = await actions.edit(request.app, request.app.state.redis, drop_id, who, patch,
                              expected_version=_if_match(request))
    return _answer(drop)


async def schedule(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    data = await read_json(request)
    reject_unknown(data, ("starts_at",))
    now = _now()
    starts_at = None
    if data.get("starts_at") is not None:
        starts_at = parse_time(data["starts_at"], "starts_at", now=now)
    drop = await actions.schedule(request.app, request.app.state.redis, drop_id, who,
                                  starts_at, now=now)
    return _answer(drop)


async def go_live(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    await _no_body(request)
    drop = await actions.go_live(request.app, request.app.state.redis, drop_id, who)
    reminders = getattr(request.app.state, "reminders", None)
    if reminders is not None:  # the "it's live" reminders go out now, not at the next scan
        reminders.wake()
    return _answer(drop)


async def pin(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    data = await read_json(request)
    if "product_id" not in data:
        raise ValidationFailed("product_id is required (null unpins)",
                               details={"field": "product_id"})
    product_id = parse_product_id(data, required=False)
    return _answer(await actions.pin(request.app, request.app.state.redis, drop_id, who,
                                     product_id))


async def buy_now(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    product_id = parse_product_id(await read_json(request))
    assert product_id is not None
    return _answer(await actions.buy_now(request.app, request.app.state.redis, drop_id, who,
                                         product_id))


async def close(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    product_id = parse_product_id(await read_json(request), required=False)
    return _answer(await actions.close(request.app, request.app.state.redis, drop_id, who,
                                       product_id))


async def end(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    await _no_body(request)
    return _answer(await actions.end(request.app, request.app.state.redis, drop_id, who))


async def sell_replay(request: Request) -> JSONResponse:
    drop_id = _drop_id(request)
    who = await _creator(request)
    await _no_body(request)
    return _answer(await actions.sell_replay(request.app, request.app.state.redis, drop_id,
                                             who))


async def list_transitions(request: Request) -> JSONResponse:
    """The drop's audit trail (creator and admins)."""
    drop_id = _drop_id(request)
    who = await _creator(request)
    creator_id = await request.app.state.db.fetchval(
        "SELECT creator_id FROM drops WHERE id = $1", drop_id)
    if creator_id is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    require_drop_owner(who, creator_id)
    rows = await store.transitions(request.app.state.db, drop_id)
    return JSONResponse({"transitions": [
        {"from": r["from_state"], "to": r["to_state"], "actor_id": r["actor_id"],
         "at": actions.iso(r["at"])} for r in rows]})


async def _no_body(request: Request) -> None:
    reject_unknown(await read_json(request), ())


_ID = "/v1/drops/{drop_id:id}"

part = Component(
    name="drops.lifecycle",
    routes=[
        Route("/v1/drops", create_drop, methods=["POST"]),
        Route("/v1/drops", list_drops, methods=["GET"]),
        Route(_ID, get_drop, methods=["GET"]),
        Route(_ID, guard_sales(update_drop), methods=["PATCH"]),
        Route(f"{_ID}/schedule", guard_sales(schedule), methods=["POST"]),
        Route(f"{_ID}/live", guard_sales(go_live), methods=["POST"]),
        Route(f"{_ID}/go-live", guard_sales(go_live), methods=["POST"]),     # alias (web console)
        Route(f"{_ID}/pin", guard_sales(pin), methods=["POST"]),
        Route(f"{_ID}/buy-now", guard_sales(buy_now), methods=["POST"]),
        Route(f"{_ID}/close", guard_sales(close), methods=["POST"]),
        Route(f"{_ID}/end", guard_sales(end), methods=["POST"]),
        Route(f"{_ID}/replay-sales", guard_sales(sell_replay), methods=["POST"]),
        Route(f"{_ID}/transitions", guard_sales(list_transitions), methods=["GET"]),
    ],
)
