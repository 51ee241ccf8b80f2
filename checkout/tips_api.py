"""Tips over HTTP: the creator's amounts, sending a tip, reading, refunding; the sweep.

* ``POST /v1/drops/{id}/tip-amounts`` -- the drop's creator sets the amounts viewers
  may tip (``[]``: tips off).
* ``GET /v1/drops/{id}/tips`` -- the amounts and the latest paid tips (anyone); the
  creator and admins also get the totals the console shows.
* ``POST /v1/drops/{id}/tips`` -- a signed-in viewer tips while the drop is on air:
  ``amount`` from the list, optional ``message``, ``idempotency_key``; the answer has
  the PaymentIntent's ``client_secret`` for Stripe.js.
* ``GET /v1/tips/{tip_id}`` -- the tipper, the drop's creator, an admin.
* ``POST /v1/tips/{tip_id}/refund`` -- the drop's creator or an admin.
* ``POST /v1/dev/tips/{tip_id}/confirm`` -- fake gateway only: Stripe.js' part.

Start-up builds :class:`checkout.tips.Tips` (``app.state.tips``) after the payments
part (it uses its gateway) and, in the node's chore worker (dropserver.chores), runs
:meth:`~checkout.tips.Tips.sweep` every ``SWEEP_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout.auction_rules import check_idempotency_key
from checkout.payment_types import GatewayError
from checkout.tips import MAX_MESSAGE, TipError, Tips, tip_json
from drops.lifecycle import ON_AIR, DropState
from dropserver.auth import Principal, Role, principal, require, require_drop_owner
from dropserver.background import Periodic
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError, Conflict, NotFound, ValidationFailed
from dropserver.http import field, read_json, reject_unknown
from realtime.chat import active_moderation
from realtime.moderators import guard_sales

__all__ = ["part"]

log = logging.getLogger("dropserver.tips")

SWEEP_INTERVAL_S = 10.0
MAX_AMOUNTS = 6
MAX_TIP = 10**8  # minor units: a million in the drop's currency


async def _drop(request: Request) -> dict[str, Any]:
    drop_id = request.path_params["drop_id"]
    row = await request.app.state.db.fetchrow(
        "SELECT id, creator_id, state, currency, tip_amounts FROM drops WHERE id = $1",
        drop_id)
    if row is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    out = dict(row)
    out["currency"] = out["currency"].strip()
    out["tip_amounts"] = [int(a) for a in out["tip_amounts"] or []]
    return out


def _tips(request: Request) -> Tips:
    return request.app.state.tips


async def set_amounts(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    drop = await _drop(request)
    require_drop_owner(who, drop["creator_id"])
    data = await read_json(request)
    reject_unknown(data, ("amounts",))
    amounts = field(data, "amounts", list, max_len=MAX_AMOUNTS)
    for i, a in enumerate(amounts):
        if not isinstance(a, int) or isinstance(a, bool) or not 1 <= a <= MAX_TIP:
            raise ValidationFailed(f"amounts[{i}] must be an integer from 1 to {MAX_TIP} "
                                   "(minor units)", details={"field": f"amounts[{i}]"})
    if len(set(amounts)) != len(amounts):
        raise ValidationFailed("amounts must not repeat", details={"field": "amounts"})
    if drop["state"] == DropState.SETTLED:
        raise Conflict("the drop is settled", code="drop_settled")
    amounts = sorted(amounts)
    await request.app.state.db.execute("UPDATE drops SET tip_amounts = $2 WHERE id = $1",
                                       drop["id"], amounts)
    return JSONResponse({"drop_id": drop["id"], "currency": drop["currency"],
                         "amounts": amounts})


async def list_tips(request: Request) -> JSONResponse:
    drop = await _drop(request)
    rows = await request.app.state.db.fetch(
        "SELECT t.public_id, t.drop_id, t.display_name, t.amount, t.currency, t.message, "
        "t.state, t.created_at, t.paid_at FROM tips t WHERE t.drop_id = $1 "
        "AND t.state = 'paid' ORDER BY t.paid_at DESC, t.id DESC LIMIT 20", drop["id"])
    body: dict[str, Any] = {"drop_id": drop["id"], "currency": drop["currency"],
                            "amounts": drop["tip_amounts"],
                            "recent": [tip_json(r) for r in rows]}
    who = await _maybe(request)
    if who is not None and who.can_manage(drop["creator_id"]):
        body["totals"] = await _tips(request).totals(drop["id"])
    return JSONResponse(body)


async def _maybe(request: Request) -> Principal | None:
    who = await principal(request)
    return None if who.is_guest else who


async def send_tip(request: Request) -> JSONResponse:
    who = await require(request)
    drop = await _drop(request)
    data = await read_json(request)
    reject_unknown(data, ("amount", "message", "idempotency_key"))
    amount = field(data, "amount", int, min_value=1, max_value=MAX_TIP)
    message = field(data, "message", str, default="", max_len=MAX_MESSAGE).strip()
    key = (check_idempotency_key(data["idempotency_key"])
           if data.get("idempotency_key") is not None else secrets.token_hex(12))
    if drop["state"] not in ON_AIR:
        raise Conflict(f"tips are taken while the drop is on air; it is {drop['state']}",
                       code="drop_not_on_air", details={"state": drop["state"]})
    if not drop["tip_amounts"]:
        raise Conflict("the creator has not turned tips on for this drop",
                       code="tips_off")
    db = request.app.state.db
    # the chat's mutes and bans hold for a tip's message, which the chat shows
    blocked = (await active_moderation(db, drop["id"], drop["creator_id"])).get(
        who.user_id, "")
    if blocked.startswith("ban:"):
        raise ApiError("you are banned from this drop's chat", code="banned", status=403)
    if blocked.startswith("mute:") and message:
        raise ApiError("you are muted in this drop's chat: tip without a message",
                       code="muted", status=403, details={"field": "message"})
    await db.execute("INSERT INTO users (id, display_name, role) VALUES ($1, $2, $3) "
                     "ON CONFLICT (id) DO NOTHING", who.user_id, who.name or "",
                     who.role.value if who.role else "viewer")
    try:
        row, intent = await _tips(request).send(
            drop=drop, user_id=who.user_id, display_name=who.name or "", amount=amount,
            message=message, idempotency_key=key)
    except TipError as exc:
        raise ApiError(str(exc), code=exc.code, status=exc.status,
                       details={"field": "amount"} if exc.status == 422 else None) from None
    except GatewayError as exc:
        if exc.retryable:
            raise ApiError(f"the payment service is unavailable ({exc.code}); retry with "
                           "the same idempotency_key", code="unavailable", status=503,
                           headers={"Retry-After": "1"}) from None
        raise ApiError(str(exc), code=exc.code, status=402) from None
    body = tip_json(row, private=True)
    body["intent_id"] = row["intent_id"]
    if intent is not None and row["state"] == "payment_pending":
        body["client_secret"] = intent.client_secret
    log.info("tip", extra={"drop_id": drop["id"], "user_id": who.user_id,
                           "tip_id": row["public_id"], "state": row["state"]})
    return JSONResponse(body, status_code=201)


async def _own_tip(request: Request, who: Principal, *, manage: bool) -> Any:
    row = await _tips(request).by_public_id(request.path_params["tip_id"])
    creator = None
    if row is not None:
        creator = await request.app.state.db.fetchval(
            "SELECT creator_id FROM drops WHERE id = $1", row["drop_id"])
    allowed = row is not None and (who.can_manage(creator) or
                                   (not manage and row["user_id"] == who.user_id))
    if not allowed:
        raise NotFound("no such tip", code="tip_not_found")
    return row


async def _tip_creator(request: Request) -> str | None:
    """The creator of the drop the tip in the path was sent in."""
    return await request.app.state.db.fetchval(
        "SELECT d.creator_id FROM tips t JOIN drops d ON d.id = t.drop_id "
        "WHERE t.public_id = $1", request.path_params["tip_id"])


async def get_tip(request: Request) -> JSONResponse:
    who = await require(request)
    row = await _own_tip(request, who, manage=False)
    return JSONResponse(tip_json(row, private=True))


async def refund_tip(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row = await _own_tip(request, who, manage=True)
    reject_unknown(await read_json(request), ())
    try:
        row = await _tips(request).refund(row)
    except TipError as exc:
        raise ApiError(str(exc), code=exc.code, status=exc.status,
                       details={"state": row["state"]}) from None
    except GatewayError as exc:
        if exc.retryable:
            raise
        raise ApiError(str(exc), code=exc.code, status=409) from None
    return JSONResponse(tip_json(row, private=True))


async def fake_confirm_tip(request: Request) -> JSONResponse:
    """Dev only (fake gateway): what Stripe.js does with the tip's client secret."""
    from checkout.fake_gateway import FakeGateway

    state = request.app.state
    if not isinstance(state.payments_gateway, FakeGateway):
        raise NotFound("only with DROPSERVER_PAYMENT_GATEWAY=fake", code="not_available")
    who = await require(request)
    data = await read_json(request)
    reject_unknown(data, ("payment_method",))
    pm = field(data, "payment_method", str, default="pm_card_visa", max_len=64)
    row = await _tips(request).by_public_id(request.path_params["tip_id"])
    if row is None or row["user_id"] != who.user_id or row["intent_id"] is None:
        raise NotFound("no such tip awaiting payment", code="tip_not_found")
    try:
        intent = await state.payments_gateway.confirm_as_buyer(row["intent_id"], pm)
    except GatewayError as exc:
        raise ApiError(str(exc), code=exc.code, status=409) from None
    result = await _tips(request).apply_intent(row, intent)
    return JSONResponse({"tip_id": row["public_id"], "state": result,
                         "status": intent.status.value, "error": intent.error_code})


async def _startup(app: Starlette) -> None:
    state = app.state

    async def on_refunded(drop_id: int) -> None:
        from drops import settlement_store

        await settlement_store.reverse_if_settled(state.db, drop_id)

    state.tips = Tips(state.db, state.redis, state.payments_gateway,
                      on_refunded=on_refunded)
    state.tips_sweep = Periodic("tips-sweep", SWEEP_INTERVAL_S, state.tips.sweep, log,
                                "tips sweep")
    if chores(app):  # one per node (dropserver.chores)
        state.tips_sweep.start()


async def _shutdown(app: Starlette) -> None:
    sweep = getattr(app.state, "tips_sweep", None)
    if sweep is not None:
        await sweep.stop()


_D = "/v1/drops/{drop_id:id}"

part = Component(
    name="checkout.tips",
    routes=[
        Route(f"{_D}/tip-amounts", guard_sales(set_amounts), methods=["POST"]),
        Route(f"{_D}/tips", list_tips, methods=["GET"]),
        Route(f"{_D}/tips", send_tip, methods=["POST"]),
        Route("/v1/tips/{tip_id}", get_tip, methods=["GET"]),
        Route("/v1/tips/{tip_id}/refund",
              guard_sales(refund_tip, creator_of=_tip_creator, hidden=("tip_not_found",)),
              methods=["POST"]),
        Route("/v1/dev/tips/{tip_id}/confirm", fake_confirm_tip, methods=["POST"]),
    ],
    startup=_startup,
    shutdown=_shutdown,
)
