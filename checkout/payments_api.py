"""Payments: order workers, Stripe, webhooks, campaigns (routes and hooks).

Start-up builds the gateway ``DROPSERVER_PAYMENT_GATEWAY`` names, starts
``DROPSERVER_ORDER_WORKERS`` order consumers (every worker) and the campaign deadline
loop (the node's chore worker, dropserver.chores); shutdown
stops them. Objects on ``app.state``: ``payments_gateway``, ``order_processor``,
``order_workers``, ``campaign_loop``.

Routes: ``POST /v1/webhooks/stripe`` (signature-verified, see checkout/webhooks.py);
``GET /v1/orders/{order_id}`` (the order as PostgreSQL has it, or its hold before
the hold journal writes the row);
``POST /v1/orders/{order_id}/refund`` (an admin or the drop's creator refunds a paid
order in full); ``POST /v1/dev/orders/{order_id}/confirm`` (fake gateway only:
Stripe.js stand-in; mounted only under ``dropserver dev`` or with
``DROPSERVER_UNSAFE_FAKE_PAYMENTS=1``).

With the fake gateway, its events go to the same handler as Stripe's webhooks
(:func:`checkout.webhooks.handle_event`), so a refund is recorded the same way
whichever gateway made it.
"""

from __future__ import annotations

import logging
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import campaigns, webhooks
from checkout.auction_events import RecentAuctionEvents
from checkout.fake_gateway import FakeGateway
from checkout.order_events import RecentOrders
from checkout.order_worker import OrderWorker, ReplicationFence
from checkout.orders import OrderProcessor
from checkout.payments import create_gateway
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError
from realtime.moderators import guard_sales

log = logging.getLogger("dropserver.payments")

MAX_WEBHOOK_BYTES = 1024 * 1024


async def stripe_webhook(request: Request) -> JSONResponse:
    """Verify on the raw body, store the event id, apply the object's current state."""
    state = request.app.state
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BYTES:
            raise ApiError("webhook body too large", code="payload_too_large", status=413)
    try:
        event = webhooks.verify(bytes(body), request.headers.get("stripe-signature"),
                                state.settings.stripe_webhook_secret)
    except webhooks.WebhookError as exc:
        status = 503 if exc.code == "not_configured" else 400
        raise ApiError(str(exc), code=exc.code, status=status) from None
    result = await webhooks.handle_event(event, db=state.db,
                                         gateway=state.payments_gateway,
                                         processor=state.order_processor,
                                         tips=getattr(state, "tips", None))
    return JSONResponse({"received": True, "id": event["id"], "result": result.value})


async def fake_confirm(request: Request) -> JSONResponse:
    """Dev only (fake gateway): what Stripe.js does with the client secret. The buyer
    confirms their client-confirmed order with a test payment method."""
    from checkout.payments import FakeGateway, GatewayError
    from dropserver.auth import require
    from dropserver.errors import NotFound
    from dropserver.http import field, read_json, reject_unknown

    state = request.app.state
    gateway = state.payments_gateway
    if not isinstance(gateway, FakeGateway):
        raise NotFound("only with DROPSERVER_PAYMENT_GATEWAY=fake", code="not_available")
    who = await require(request)
    data = await read_json(request)
    reject_unknown(data, ("payment_method",))
    pm = field(data, "payment_method", str, default="pm_card_visa", max_len=64)
    order = await state.db.fetchrow(
        "SELECT o.id, o.public_id, o.drop_id, o.product_id, o.user_id, o.state, "
        "o.payment_flow, p.intent_id FROM orders o JOIN payments p ON p.order_id = o.id "
        "WHERE o.public_id = $1", request.path_params["order_id"])
    if order is None or order["user_id"] != who.user_id:
        raise NotFound("no such order awaiting payment", code="order_not_found")
    try:
        intent = await gateway.confirm_as_buyer(order["intent_id"], pm)
    except GatewayError as exc:
        raise ApiError(str(exc), code=exc.code, status=409) from None
    result = await state.order_processor.apply_intent(order, intent)
    return JSONResponse({"order_id": order["public_id"], "state": result.value,
                         "status": intent.status.value, "error": intent.error_code})


async def get_order(request: Request) -> JSONResponse:
    """An order as PostgreSQL has it: what a buyer reads after a reconnect (private
    events are best effort). The buyer, the drop's creator or an admin; anyone else
    gets the same 404 as for an unknown order. The client secret goes to the buyer
    only, while the payment is pending."""
    from checkout.keys import parse_hold_id
    from checkout.order_rows import order_columns
    from dropserver.auth import require
    from dropserver.errors import NotFound

    state = request.app.state
    who = await require(request)
    if parse_hold_id(request.path_params["order_id"]) is None:
        raise NotFound("no such order", code="order_not_found")
    row = await state.db.fetchrow(
        f"SELECT {order_columns('o')}, d.creator_id, p.intent_id, p.status AS pay_status, "
        "p.amount_received, p.amount_refunded FROM orders o "
        "JOIN drops d ON d.id = o.drop_id LEFT JOIN payments p ON p.order_id = o.id "
        "WHERE o.public_id = $1", request.path_params["order_id"])
    if row is None:
        return JSONResponse(await _held_order(state, who, request.path_params["order_id"]))
    if not (row["user_id"] == who.user_id or who.can_manage(row["creator_id"])):
        raise NotFound("no such order", code="order_not_found")
    payment = None
    if row["intent_id"] is not None:
        payment = {"status": row["pay_status"], "intent_id": row["intent_id"],
                   "amount_received": row["amount_received"],
                   "amount_refunded": row["amount_refunded"]}
        if row["state"] == "payment_pending" and row["user_id"] == who.user_id:
            intent = await state.payments_gateway.retrieve_intent(row["intent_id"])
            payment["client_secret"] = intent.client_secret
    return JSONResponse({
        "order_id": row["public_id"], "drop_id": row["drop_id"],
        "product_id": row["product_id"], "state": row["state"],
        "released": row["released"], "quantity": row["quantity"],
        "buyer_number": row["buyer_number"], "amount": row["amount"],
        "currency": row["currency"].strip(), "flow": row["payment_flow"],
        "hold_expires_at": int(row["hold_expires_at"].timestamp() * 1000),
        "payment": payment})


async def _held_order(state, who, order_id: str) -> dict:
    """An order whose row is not written yet: the buy is answered before the hold
    journal writes it (checkout/journal.py), so a buyer who reads the order at once
    finds only the hold. Answered from the hold, in the order's shape: ``held``, no
    payment yet. Else (no hold either, or not the caller's) ``404 order_not_found``."""
    from dropserver.errors import NotFound

    hold = await state.reservations.get_hold(order_id)
    if hold is None or hold.get("state") != "held" or not (
            hold.get("user_id") == who.user_id or who.can_manage(await state.db.fetchval(
                "SELECT creator_id FROM drops WHERE id = $1", hold["drop_id"]))):
        raise NotFound("no such order", code="order_not_found")
    return {"order_id": order_id, "drop_id": hold["drop_id"],
            "product_id": hold["product_id"], "state": "held", "released": None,
            "quantity": hold["quantity"], "buyer_number": hold["buyer_number"],
            "amount": hold["amount"], "currency": hold["currency"],
            "flow": hold.get("flow") or "client_confirm",
            "hold_expires_at": hold["expires_at"], "payment": None}


async def refund_order(request: Request) -> JSONResponse:
    """An admin (or the drop's creator) refunds a paid order in full. Idempotent: a
    refunded order answers its refund again; the refund is recorded as every other
    (``amount_refunded``, ``refunded``, ``order.refunded``, the ledger if settled)."""
    from checkout.keys import parse_hold_id
    from checkout.order_rows import order_columns
    from checkout.payments import GatewayError
    from dropserver.auth import Role, require, require_drop_owner
    from dropserver.errors import NotFound

    state = request.app.state
    who = await require(request, Role.CREATOR, Role.ADMIN)
    if parse_hold_id(request.path_params["order_id"]) is None:
        raise NotFound("no such order", code="order_not_found")
    order = await state.db.fetchrow(
        f"SELECT {order_columns('o')}, d.creator_id FROM orders o "
        "JOIN drops d ON d.id = o.drop_id WHERE o.public_id = $1",
        request.path_params["order_id"])
    if order is None:
        raise NotFound("no such order", code="order_not_found")
    require_drop_owner(who, order["creator_id"])
    if order["state"] != "refunded":
        try:
            await state.order_processor.refund(order)
        except GatewayError as exc:
            if exc.retryable:
                raise
            raise ApiError(str(exc), code=exc.code, status=409,
                           details={"state": order["state"]}) from None
    row = await state.db.fetchrow(
        "SELECT o.state, p.amount_refunded, p.currency FROM orders o "
        "JOIN payments p ON p.order_id = o.id WHERE o.id = $1", order["id"])
    return JSONResponse({"order_id": order["public_id"], "state": row["state"],
                         "amount_refunded": row["amount_refunded"],
                         "currency": row["currency"].strip()})


async def _order_creator(request: Request) -> str | None:
    """The creator of the drop the order in the path belongs to (a moderator of theirs
    is told ``moderator_not_allowed``: refunds are sales)."""
    return await request.app.state.db.fetchval(
        "SELECT d.creator_id FROM orders o JOIN drops d ON d.id = o.drop_id "
        "WHERE o.public_id = $1", request.path_params["order_id"])


async def startup(app: Starlette) -> None:
    state = app.state
    settings = state.settings
    gateway = create_gateway(settings, state.redis)
    state.payments_gateway = gateway

    async def on_authorized(drop_id: int) -> None:
        await campaigns.broadcast_progress(state.db, state.redis, drop_id)

    async def on_refunded(drop_id: int) -> None:
        from drops import settlement_store

        await settlement_store.reverse_if_settled(state.db, drop_id)

    processor = OrderProcessor(state.db, state.redis, gateway, on_authorized=on_authorized,
                               on_refunded=on_refunded)
    state.order_processor = processor
    hub = getattr(state, "realtime", None)
    if hub is not None:  # private events a socket missed come from the orders
        hub.private.add_source(RecentOrders(state.db, gateway))
        hub.private.add_source(RecentAuctionEvents(state.db))
    if isinstance(gateway, FakeGateway):
        async def on_event(event: dict) -> None:
            await webhooks.handle_event(event, db=state.db, gateway=gateway,
                                        processor=processor,
                                        tips=getattr(state, "tips", None))

        gateway.listeners.append(on_event)
    state.order_workers = []
    # With replicas, the workers record only what a failover keeps (checkout.order_worker).
    replicas = settings.effective_hold_replicas
    state.order_fence = (ReplicationFence(settings.redis_url, replicas=replicas,
                                          timeout_ms=settings.hold_replica_timeout_ms)
                         if replicas > 0 else None)
    for i in range(settings.order_workers):
        worker = OrderWorker(
            state.redis, processor, consumer=f"{state.node_id}:{i}:{secrets.token_hex(3)}",
            claim_idle_ms=settings.order_claim_idle_ms,
            max_attempts=settings.order_max_attempts, fence=state.order_fence)
        worker.start()
        state.order_workers.append(worker)
    state.campaign_loop = campaigns.DeadlineLoop(
        state.db, state.redis, gateway, processor, settings.campaign_check_interval)
    if chores(app):  # one per node (dropserver.chores)
        state.campaign_loop.start()
    log.info("payments started", extra={"gateway": gateway.name,
                                        "order_workers": settings.order_workers})


async def shutdown(app: Starlette) -> None:
    state = app.state
    loop = getattr(state, "campaign_loop", None)
    if loop is not None:
        await loop.stop()
    for worker in getattr(state, "order_workers", []):
        await worker.stop()
    fence = getattr(state, "order_fence", None)
    if fence is not None:
        await fence.aclose()
    gateway = getattr(state, "payments_gateway", None)
    if gateway is not None:
        await gateway.close()


part = Component(
    name="checkout.payments",
    routes=[Route("/v1/webhooks/stripe", stripe_webhook, methods=["POST"]),
            Route("/v1/orders/{order_id}", get_order, methods=["GET"]),
            Route("/v1/orders/{order_id}/refund",
                  guard_sales(refund_order, creator_of=_order_creator), methods=["POST"]),
            Route("/v1/dev/orders/{order_id}/confirm", fake_confirm, methods=["POST"])],
    startup=startup,
    shutdown=shutdown,
)
