"""Settlement: ledger, payouts, report (routes and hooks).

* ``POST /v1/drops/{id}/stakes`` -- the drop's creator or an admin records an
  investor's stake (``investor_id``, ``amount`` in minor units, optional
  ``stripe_account_id``); recording it again replaces it. Not after settlement.
* ``GET /v1/drops/{id}/stakes`` -- the stakes.
* ``POST /v1/drops/{id}/settle`` -- creator or admin; the drop must be ``ended``:
  posts the ledger, sends the payouts, moves it to ``settled`` (idempotent).
* ``GET /v1/drops/{id}/settlement`` -- the report (creator, admin, or an investor of
  the drop).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from drops import settlement_store
from drops.actions import mark_settled
from dropserver.auth import Role, require, require_drop_owner
from dropserver.component import Component
from dropserver.errors import Conflict, Forbidden, NotFound, ValidationFailed
from dropserver.http import field, read_json, reject_unknown
from realtime.moderators import guard_sales

_MAX_STAKE = 10**13


def _drop_id(request: Request) -> int:
    return request.path_params["drop_id"]  # the ``id`` convertor: 1 <= id < 10^18


async def _drop(request: Request, drop_id: int) -> dict[str, Any]:
    row = await request.app.state.db.fetchrow(
        "SELECT id, creator_id, state, currency FROM drops WHERE id = $1", drop_id)
    if row is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    return dict(row)


def _json(data: Any, status: int = 200) -> JSONResponse:
    def default(o: Any) -> Any:
        return str(o)

    import json

    return JSONResponse(json.loads(json.dumps(data, default=default)), status_code=status)


async def put_stake(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    drop_id = _drop_id(request)
    drop = await _drop(request, drop_id)
    require_drop_owner(who, drop["creator_id"])
    data = await read_json(request)
    reject_unknown(data, ("investor_id", "amount", "stripe_account_id"))
    investor = field(data, "investor_id", str, max_len=128)
    if not investor:
        raise ValidationFailed("investor_id must not be empty", details={"field": "investor_id"})
    amount = field(data, "amount", int, min_value=1, max_value=_MAX_STAKE)
    account = field(data, "stripe_account_id", str, default=None, max_len=255)
    if account is not None and not account.startswith("acct_"):
        raise ValidationFailed("stripe_account_id must be a Connect account id (acct_...)",
                               details={"field": "stripe_account_id"})
    if drop["state"] == "settled":
        raise Conflict("the drop is settled; stakes can no longer change",
                       code="drop_settled")
    db = request.app.state.db
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO users (id, role) VALUES ($1, 'investor') "
                           "ON CONFLICT DO NOTHING", investor)
        await conn.execute(
            """INSERT INTO investor_stakes (drop_id, investor_id, amount, currency,
                   stripe_account_id)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (drop_id, investor_id) DO UPDATE
               SET amount = EXCLUDED.amount,
                   stripe_account_id = COALESCE(EXCLUDED.stripe_account_id,
                                                investor_stakes.stripe_account_id)""",
            drop_id, investor, amount, drop["currency"], account)
    return await _stakes_response(request, drop_id, 201)


async def _stakes_response(request: Request, drop_id: int, status: int = 200
                           ) -> JSONResponse:
    rows = await request.app.state.db.fetch(
        "SELECT investor_id, amount, currency, stripe_account_id FROM investor_stakes "
        "WHERE drop_id = $1 ORDER BY investor_id", drop_id)
    return _json({"drop_id": drop_id, "stakes": [dict(r) for r in rows]}, status)


async def get_stakes(request: Request) -> JSONResponse:
    who = await require(request)
    drop_id = _drop_id(request)
    drop = await _drop(request, drop_id)
    await _may_read(request, who, drop)
    return await _stakes_response(request, drop_id)


async def _may_read(request: Request, who: Any, drop: dict[str, Any]) -> None:
    if who.can_manage(drop["creator_id"]):
        return
    staked = await request.app.state.db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM investor_stakes WHERE drop_id = $1 "
        "AND investor_id = $2)", drop["id"], who.user_id)
    if not staked:
        raise Forbidden("only the drop's creator, its investors or an admin may see this",
                        code="not_drop_owner")


async def settle(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    drop_id = _drop_id(request)
    drop = await _drop(request, drop_id)
    require_drop_owner(who, drop["creator_id"])
    reject_unknown(await read_json(request), ())  # settle takes no fields
    state = request.app.state
    open_orders = await settlement_store.settle_drop(state.db, state.payments_gateway,
                                                     drop_id)
    await mark_settled(state.db, state.redis, drop_id)  # False when already settled
    report = await settlement_store.report(state.db, drop_id)
    report["open_orders_at_settlement"] = open_orders
    return _json(report)


async def get_settlement(request: Request) -> JSONResponse:
    who = await require(request)
    drop_id = _drop_id(request)
    drop = await _drop(request, drop_id)
    await _may_read(request, who, drop)
    return _json(await settlement_store.report(request.app.state.db, drop_id))


part = Component(
    name="drops.settlement",
    routes=[
        Route("/v1/drops/{drop_id:id}/stakes", guard_sales(put_stake), methods=["POST"]),
        Route("/v1/drops/{drop_id:id}/stakes", guard_sales(get_stakes), methods=["GET"]),
        Route("/v1/drops/{drop_id:id}/settle", guard_sales(settle), methods=["POST"]),
        Route("/v1/drops/{drop_id:id}/settlement", guard_sales(get_settlement), methods=["GET"]),
    ],
)
