"""The order processor: turns holds into orders and payments, and keeps the buyer told.

:class:`OrderProcessor` applies what happens to an order -- a stream entry
(``type=reserve`` / ``type=release``, :mod:`checkout.order_entries`), a PaymentIntent's
new state (the order worker, a webhook, the dev confirm route, a campaign's capture), a
refund -- to PostgreSQL, the gateway, Redis' hold and the buyer. Every step is
idempotent and a re-run after a crash or an outage repeats nothing that was done:

reserve
  1. INSERT the ``orders`` row (state ``held``): PostgreSQL is the source of truth;
     an order of amount 0 (a giveaway's prize, :mod:`checkout.prizes`) is ``paid``
     at once, with no PaymentIntent;
  2. create the PaymentIntent with the idempotency key ``pi:<hold id>`` (a re-run gets
     the same intent back from the gateway, never a second charge);
  3. INSERT the ``payments`` row, move the order to the intent's state (a hold that
     lapsed or was released before any intent was asked for is recorded ``expired``
     or released and never charged; ``orders.payment_requested``, set before the
     gateway is asked, tells a retry that a charge may exist without its row, and
     the retry asks again with the same key and undoes it);
release (the hold expired, was cancelled, or its payment failed)
  the order moves to that state and ``orders.released`` says its units went back; the
  intent is cancelled, or refunded when it already succeeded;
an intent that succeeded for a released hold (a late payment)
  is refunded and the refund recorded (:meth:`OrderProcessor.record_refund`:
  ``payments.amount_refunded``, the order ``refunded``, the ledger reversed if the drop
  was settled), whichever path saw it;
and after each of them
  the buyer hears the order's state once (:meth:`OrderProcessor.tell`: ``order.payment``,
  ``order.paid``, ``order.failed``, ``order.expired``, ``order.cancelled``,
  ``order.refunded``; ``orders.told`` remembers what was said).

Errors are raised, never swallowed: an outage (:func:`checkout.retry.is_outage`) makes
the caller try again -- the order worker retries the entry, a webhook answers 500 and
Stripe delivers again. States and transitions are :mod:`checkout.order_states`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
from redis.asyncio import Redis

from checkout import keys
from checkout.campaign_rules import check_deadline
from checkout.order_entries import (
    BadEntry,
    ReleaseEntry,
    ReserveEntry,
    intent_key,
    transfer_group,
)
from checkout.order_events import claim_marker, event_data, publish_user, publish_user_once
from checkout.order_rows import insert_orders, order_columns
from checkout.order_states import (
    OPEN_STATES,
    OUTCOMES,
    RELEASED_STATES,
    OrderState,
    event_for,
    sources_of,
    state_for_intent,
)
from checkout.payment_types import Flow, Gateway, GatewayError, Intent, IntentStatus
from checkout.refunds import refund_in_full
from checkout.retry import NotYet
from dropserver.observability import bind
from dropserver.outbound import EventType, enqueue

__all__ = ["OrderProcessor", "hold_paid", "publish_user", "release_hold"]

log = logging.getLogger("dropserver.orders")

S = OrderState
Notify = Callable[[Any, str, str, dict], Awaitable[None]]

_COLS = order_columns()
# Order states an outbound webhook reports (dropserver.outbound).
_WEBHOOK_EVENTS = {S.PAID: EventType.ORDER_PAID, S.REFUNDED: EventType.ORDER_REFUNDED}
_CANCELLABLE = (IntentStatus.REQUIRES_PAYMENT_METHOD, IntentStatus.REQUIRES_CONFIRMATION,
                IntentStatus.REQUIRES_ACTION, IntentStatus.REQUIRES_CAPTURE)


# ---------------------------------------------------------------------------
# adapters: reservations' hold
# ---------------------------------------------------------------------------
async def hold_paid(redis: Any, hold_id: str) -> OrderState | None:
    """Tell reservations the hold is paid (or authorized) so it stops expiring.

    Returns the state the hold was *released* to (expired, cancelled, failed) when it
    is too late -- its units went back to stock and the payment must be undone -- and
    None otherwise. A hold Redis does not know (lost with Redis) is left to
    PostgreSQL, the source of truth: recovery and the reconciler restore it as paid.
    Redis errors are raised (the caller retries an outage)."""
    from checkout import holds

    try:
        await holds.mark_paid(redis, hold_id)
    except LookupError as exc:
        state = str(exc).strip("'\"")
        if state in {s.value for s in RELEASED_STATES}:
            return OrderState(state)
        log.warning("hold unknown to Redis while paying", extra={"hold_id": hold_id})
    return None


async def release_hold(redis: Any, hold_id: str, reason: OrderState | str = "failed") -> None:
    """The order failed or its intent was cancelled: give the units back
    (``release.lua``, a no-op unless the hold is still held)."""
    from checkout import holds

    await holds.release(redis, hold_id, OrderState(reason).value)


# ---------------------------------------------------------------------------
# the processor
# ---------------------------------------------------------------------------
class OrderProcessor:
    """Applies order stream entries, intents and refunds (see the module docstring)."""

    def __init__(self, db: asyncpg.Pool, redis: Redis, gateway: Gateway, *,
                 notify: Notify = publish_user,
                 on_authorized: Callable[[int], Awaitable[None]] | None = None,
                 on_refunded: Callable[[int], Awaitable[Any]] | None = None) -> None:
        self.db = db
        self.redis = redis
        self.gateway = gateway
        self.notify = notify  # a test may record instead of publishing
        # campaigns: called with the drop id after a backer's card is authorized
        self.on_authorized = on_authorized
        # settlement: called with the drop id after a refund is recorded (the ledger)
        self.on_refunded = on_refunded
        # test hook: awaited after the PaymentIntent exists, before PostgreSQL knows
        self.after_intent: Callable[[Intent], Awaitable[None]] | None = None

    async def handle(self, entry: ReserveEntry | ReleaseEntry) -> None:
        bind(drop_id=entry.drop_id)
        if isinstance(entry, ReserveEntry):
            await self.reserve(entry)
        else:
            await self.release(entry)

    async def order(self, hold_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(f"SELECT {_COLS} FROM orders WHERE public_id = $1",
                                      hold_id)

    async def state_of(self, order_id: int) -> tuple[OrderState, str | None]:
        row = await self.db.fetchrow("SELECT state, released FROM orders WHERE id = $1",
                                     order_id)
        return OrderState(row["state"]), row["released"]

    # -- reserve -----------------------------------------------------------
    async def reserve(self, e: ReserveEntry) -> None:
        order = await self.record_order(e)
        state = OrderState(order["state"])
        payment = await self.db.fetchrow(
            """SELECT o.payment_requested, p.intent_id
               FROM orders o LEFT JOIN payments p ON p.order_id = o.id
               WHERE o.id = $1""", order["id"])
        if payment["intent_id"] is None and payment["payment_requested"]:
            # The gateway was asked before (an outage or a crash came between the
            # charge and its row): the same idempotency key gets that intent back, and
            # apply_intent undoes it if the hold was released meanwhile. Never taken
            # for an order that was not charged.
            intent = await self._create_intent(order, e)
            await self._record_payment(order, e, intent)
            # a replayed create answers the intent as it was then
            intent = await self.gateway.retrieve_intent(intent.id)
        elif payment["intent_id"] is None:
            if state is not S.HELD:
                # released before an intent existed: nothing to charge
                await self.tell(order)
                return
            if e.amount == 0:
                # A giveaway's prize (checkout/prizes.py): nothing to charge, no
                # PaymentIntent; its hold was made settled, so it is paid at once.
                await self.move(order, S.PAID)
                await self.tell(order)
                return
            if e.expires_at_ms and e.expires_at_ms < time.time() * 1000:
                # The hold lapsed before we got to it (an outage): charge nothing; the
                # sweeper has released (or will release) its units.
                await self.move(order, S.EXPIRED)
                await self.tell(order)
                return
            released = await self._released_in_redis(e.hold_id)
            if released is not None:
                # Cancelled (or expired) while we could not get to it: charging now
                # would only put a charge and its refund on the buyer's statement.
                await self.move(order, released)
                await self.tell(order)
                return
            intent = await self._create_intent(order, e)
            await self._record_payment(order, e, intent)
        else:
            intent = await self.gateway.retrieve_intent(payment["intent_id"])
        await self.apply_intent(order, intent)

    async def _record_payment(self, order: asyncpg.Record, e: ReserveEntry,
                              intent: Intent) -> None:
        if self.after_intent is not None:
            await self.after_intent(intent)
        await self.db.execute(
            """INSERT INTO payments (order_id, gateway, intent_id, idempotency_key,
                   status, amount, amount_received, fee, currency, capture_method,
                   capture_before, transfer_group, last_error)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                       to_timestamp($11::bigint), $12, $13)
               ON CONFLICT (order_id) DO NOTHING""",
            order["id"], self.gateway.name, intent.id, intent_key(e.hold_id),
            intent.status.value, intent.amount, intent.amount_received, intent.fee,
            intent.currency, intent.capture_method, intent.capture_before,
            intent.transfer_group, intent.error_code)

    async def _released_in_redis(self, hold_id: str) -> OrderState | None:
        from checkout import holds

        record = await holds.get_hold(self.redis, hold_id)
        state = (record or {}).get("state")
        return OrderState(state) if state in {s.value for s in RELEASED_STATES} else None

    async def record_order(self, e: ReserveEntry | Mapping[str, Any], *,
                           state: OrderState = S.HELD) -> asyncpg.Record:
        """The hold's ``orders`` row, inserted once (``ON CONFLICT DO NOTHING``) from a
        reserve entry or a Redis hold record (:func:`checkout.holds.get_hold`)."""
        if isinstance(e, ReserveEntry):
            v = (e.hold_id, e.drop_id, e.product_id, e.user_id, e.quantity, e.buyer_number,
                 e.unit_price, e.amount, e.currency, e.idempotency_key, e.expires_at_ms,
                 e.flow.value)
            variant_id = e.variant_id
        else:
            v = (e["hold_id"], int(e["drop_id"]), int(e["product_id"]), e["user_id"],
                 int(e["quantity"]), int(e["buyer_number"]), int(e["unit_price"]),
                 int(e["amount"]), str(e["currency"]).lower(), e["idempotency_key"],
                 int(e["expires_at"]), e.get("flow") or Flow.CLIENT_CONFIRM.value)
            variant_id = int(e["variant_id"]) if e.get("variant_id") else None
        created = (e.created_at_ms if isinstance(e, ReserveEntry)
                   else int(e.get("created_at") or 0))
        released = state.value if state in RELEASED_STATES else None
        async with self.db.acquire() as conn, conn.transaction():
            await insert_orders(conn, [(*v, created, state.value, released, variant_id)])
            row = await conn.fetchrow(
                f"SELECT {_COLS} FROM orders WHERE public_id = $1", v[0])
        if row is None:
            # Another order holds this buyer number: a hold Redis issued again after
            # it lost this one (two faults at once). It cannot be recorded.
            raise BadEntry(f"buyer number {v[5]} of product {v[2]} is another order's")
        return row

    async def _create_intent(self, order: asyncpg.Record, e: ReserveEntry) -> Intent:
        drop = await self.db.fetchrow(
            "SELECT kind, campaign_deadline, now() AS now FROM drops WHERE id = $1",
            e.drop_id)
        campaign = drop is not None and drop["kind"] == "campaign"
        if campaign and drop["campaign_deadline"] is not None:
            try:
                check_deadline(drop["campaign_deadline"], drop["now"])
            except ValueError as exc:  # the authorization could not be captured
                raise BadEntry(str(exc)) from None
        user = await self.db.fetchrow(
            "SELECT stripe_customer_id, default_payment_method FROM users WHERE id = $1",
            e.user_id)
        payment_method = customer = None
        if user is not None:
            customer = user["stripe_customer_id"]
            payment_method = user["default_payment_method"]
        if e.flow is Flow.OFF_SESSION and not payment_method:
            raise BadEntry("off_session order but the buyer has no saved payment method")
        if e.flow is Flow.CLIENT_CONFIRM:
            payment_method = None  # the buyer picks the card in Stripe.js
        # Before the gateway is asked: from now on a retry cannot take this order for
        # one that was never charged (reserve).
        await self.db.execute("UPDATE orders SET payment_requested = true "
                              "WHERE id = $1 AND NOT payment_requested", order["id"])
        try:
            return await self.gateway.create_intent(
                amount=e.amount, currency=e.currency, idempotency_key=intent_key(e.hold_id),
                flow=e.flow, capture_manual=campaign or e.flow is Flow.MANUAL_CAPTURE,
                payment_method=payment_method, customer=customer,
                transfer_group=transfer_group(e.drop_id),
                metadata={"order_id": e.hold_id, "drop_id": str(e.drop_id),
                          "product_id": str(e.product_id),
                          "buyer_number": str(e.buyer_number)})
        except GatewayError as exc:
            if not exc.retryable and exc.code != "idempotency_error":
                # Refused: no intent was made, so none may exist to find later (asking
                # again could make one only to refund it).
                await self.db.execute(
                    "UPDATE orders SET payment_requested = false WHERE id = $1", order["id"])
            raise

    # -- state changes -----------------------------------------------------
    async def move(self, order: Mapping[str, Any], target: OrderState, *,
                   released: str | None = None) -> bool:
        """Move the order to ``target`` if its state allows it (a released state also
        sets ``orders.released``). The buyer is told by :meth:`tell`, not here."""
        if target in RELEASED_STATES:
            released = target.value
        # paid_at / refunded_at: the receipt's dates, set the first time only
        sql = """UPDATE orders SET state = $2, released = COALESCE(released, $4),
                     updated_at = now(),
                     paid_at = CASE WHEN $2 = 'paid' THEN COALESCE(paid_at, now())
                                    ELSE paid_at END,
                     refunded_at = CASE WHEN $2 = 'refunded'
                                        THEN COALESCE(refunded_at, now())
                                        ELSE refunded_at END
                 WHERE id = $1 AND state = ANY($3::text[]) RETURNING state"""
        args = (order["id"], target.value, sources_of(target), released)
        if target not in _WEBHOOK_EVENTS:
            return await self.db.fetchrow(sql, *args) is not None
        # paid and refunded are outbound webhooks: the event commits with the state
        async with self.db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql, *args)
            if row is not None:
                await self._webhook(conn, order["id"], _WEBHOOK_EVENTS[target])
        return row is not None

    @staticmethod
    async def _webhook(conn: asyncpg.Connection, order_id: int, kind: EventType) -> None:
        o = await conn.fetchrow(
            """SELECT o.public_id, o.drop_id, o.product_id, o.user_id, o.quantity,
                      o.amount, o.currency, o.released, d.creator_id,
                      COALESCE(p.amount_refunded, 0) AS amount_refunded
               FROM orders o JOIN drops d ON d.id = o.drop_id
               LEFT JOIN payments p ON p.order_id = o.id WHERE o.id = $1""", order_id)
        data = {"order_id": o["public_id"], "drop_id": o["drop_id"],
                "product_id": o["product_id"], "buyer_id": o["user_id"],
                "quantity": o["quantity"], "amount": o["amount"],
                "currency": o["currency"].strip()}
        if kind is EventType.ORDER_REFUNDED:
            data["amount_refunded"] = o["amount_refunded"]
            data["released"] = o["released"]
        await enqueue(conn, kind, data, creator_id=o["creator_id"], drop_id=o["drop_id"],
                      key=f"{kind.value}:{o['public_id']}")

    async def _publish_once(self, marker: str, user_id: str, event: str,
                            data: dict) -> bool:
        if self.notify is publish_user:
            return await publish_user_once(self.redis, marker, user_id, event, data)
        if not await claim_marker(self.redis, marker, secrets.token_hex(8)):
            return False
        try:
            await self.notify(self.redis, user_id, event, data)
        except BaseException:
            await self.redis.delete(marker)
            raise
        return True

    async def tell(self, order: Mapping[str, Any], intent: Intent | None = None) -> bool:
        """Tell the buyer the order's current state unless they were told already.

        Tellers of one order take turns on its row (``FOR UPDATE``), so a stale state
        is never sent after a newer one. The publish carries a Redis marker
        (``{drop:D}:told:<hold>:<state>``, ``tell.lua``) set in the same atomic step, and
        ``orders.told`` records it in PostgreSQL: a crash or an outage between the
        publish and the commit re-runs the tell, which finds the marker and sends
        nothing twice. A Redis error is raised: the caller retries."""
        state, _ = await self.state_of(order["id"])
        if state not in OUTCOMES:
            return False
        if state in (S.PAYMENT_PENDING, S.AUTHORIZED) and intent is None:
            told = await self.db.fetchval("SELECT told FROM orders WHERE id = $1",
                                          order["id"])
            if told == state.value:
                return False
            intent_id = await self.db.fetchval(
                "SELECT intent_id FROM payments WHERE order_id = $1", order["id"])
            if intent_id is None:
                return False
            intent = await self.gateway.retrieve_intent(intent_id)  # the client secret
        async with self.db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT o.state, o.told, o.released, p.amount_received, p.amount_refunded,
                          COALESCE(p.currency, o.currency) AS currency, p.last_error
                   FROM orders o LEFT JOIN payments p ON p.order_id = o.id
                   WHERE o.id = $1 FOR UPDATE OF o""", order["id"])
            if row["state"] != state.value or row["told"] == state.value:
                return False  # moved on meanwhile (its own tell follows), or told
            event = event_for(state)
            assert event is not None
            body = {"order_id": order["public_id"], "drop_id": order["drop_id"],
                    "product_id": order["product_id"], **event_data(state, row, intent)}
            marker = keys.told(order["drop_id"], order["public_id"], state.value)
            sent = await self._publish_once(marker, order["user_id"], event, body)
            # updated_at: when it was told, which a socket's recovery compares with
            # when it opened (checkout.order_events.RecentOrders)
            await conn.execute("UPDATE orders SET told = $2, updated_at = clock_timestamp() "
                               "WHERE id = $1", order["id"], state.value)
        return sent

    async def record_intent(self, intent: Intent) -> bool:
        """The intent's status and amounts on its ``payments`` row; False (nothing
        written) when the row already has a final status (``succeeded``,
        ``canceled``) that ``intent`` does not: ``intent`` is an older snapshot, read
        before the payment ended by a caller that raced its applier (Stripe's final
        statuses are never left, so a later reading can only agree)."""
        status = await self.db.fetchval(
            """UPDATE payments SET status = $2,
                   amount_received = GREATEST(amount_received, $3),
                   fee = GREATEST(fee, $4), last_error = $5,
                   capture_before = COALESCE(to_timestamp($6::bigint), capture_before),
                   updated_at = now()
               WHERE intent_id = $1
                 AND (status NOT IN ('succeeded', 'canceled') OR status = $2)
               RETURNING status""",
            intent.id, intent.status.value, intent.amount_received, intent.fee,
            intent.error_code, intent.capture_before)
        return status is not None or not await self.db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM payments WHERE intent_id = $1)", intent.id)

    async def apply_intent(self, order: Mapping[str, Any], intent: Intent) -> OrderState:
        """Record the intent's current state on ``payments`` and the order. An older
        snapshot than the recorded one (two appliers raced: a redelivered order entry
        and the buyer's payment) is read again from the gateway before it decides
        anything."""
        if not await self.record_intent(intent):
            intent = await self.gateway.retrieve_intent(intent.id)
            await self.record_intent(intent)
        flow = Flow(order["payment_flow"])
        target = state_for_intent(intent, flow)
        current, _ = await self.state_of(order["id"])
        if current in RELEASED_STATES:
            # The hold was released while the payment went on: never keep money for
            # units that may be sold again.
            await self.undo(order, intent)
        elif target in (S.PAID, S.AUTHORIZED) and current in OPEN_STATES:
            released = await hold_paid(self.redis, order["public_id"])
            if released is not None:
                # the hold lapsed while the buyer paid: its units may be sold again
                await self.move(order, released)
                await self.undo(order, intent)
            else:
                await self._moved(order, target, await self.move(order, target))
        elif target is not current and current in OPEN_STATES:
            await self._moved(order, target, await self.move(order, target))
        elif target is current:
            await self._moved(order, target, False)
        await self.tell(order, intent)
        return (await self.state_of(order["id"]))[0]

    async def _moved(self, order: Mapping[str, Any], target: OrderState,
                     moved: bool) -> None:
        """What follows a state (again after a crash: each step is idempotent)."""
        if target in RELEASED_STATES:
            await release_hold(self.redis, order["public_id"], target)
        if target is S.AUTHORIZED:
            await self.db.execute(
                """INSERT INTO campaign_backers (drop_id, order_id, user_id)
                   VALUES ($1, $2, $3) ON CONFLICT DO NOTHING""",
                order["drop_id"], order["id"], order["user_id"])
            if moved and self.on_authorized is not None:
                await self.on_authorized(order["drop_id"])

    async def undo(self, order: Mapping[str, Any], intent: Intent) -> None:
        """The order's hold is released: cancel its intent, or refund it (and record
        the refund) when it already succeeded. Idempotent (keys ``cancel:<hold>`` and
        ``refund:<hold>``)."""
        hold_id = order["public_id"]
        for _ in range(3):
            try:
                if intent.status is IntentStatus.SUCCEEDED:
                    await self._refund_all(order, intent, reason="hold released")
                    return
                if intent.status is IntentStatus.PROCESSING:
                    raise NotYet(f"payment of {hold_id} is processing")
                if intent.status in _CANCELLABLE:
                    intent = await self.gateway.cancel_intent(
                        intent.id, idempotency_key=f"cancel:{hold_id}")
                await self.record_intent(intent)
                return
            except GatewayError as exc:
                if exc.code != "payment_intent_unexpected_state":
                    raise
                # it moved meanwhile (a confirm landed first): look again
                intent = await self.gateway.retrieve_intent(intent.id)
        raise NotYet(f"payment of {hold_id} keeps changing")

    async def _refund_all(self, order: Mapping[str, Any], intent: Intent, *,
                          reason: str) -> None:
        charge = await refund_in_full(self.gateway, intent,
                                      key=f"refund:{order['public_id']}")
        log.warning("refunded a payment", extra={"order_id": order["public_id"],
                                                 "reason": reason,
                                                 "amount": charge.amount_refunded})
        await self.record_refund(order, charge.amount_refunded, full=charge.refunded)

    async def refund(self, order: Mapping[str, Any]) -> OrderState:
        """Refund the order's whole payment (an admin's decision) and record it."""
        intent_id = await self.db.fetchval(
            "SELECT intent_id FROM payments WHERE order_id = $1", order["id"])
        if intent_id is None:
            raise GatewayError("the order has no payment", code="charge_not_refundable")
        intent = await self.gateway.retrieve_intent(intent_id)
        await self.record_intent(intent)
        if intent.status is not IntentStatus.SUCCEEDED:
            raise GatewayError(f"the payment is {intent.status.value}",
                               code="charge_not_refundable")
        await self._refund_all(order, intent, reason="admin")
        return (await self.state_of(order["id"]))[0]

    async def record_refund(self, order: Mapping[str, Any], amount_refunded: int, *,
                            full: bool) -> None:
        """Store the refunded amount, move a fully refunded order to ``refunded`` (a
        released one keeps ``orders.released``: its units are back in stock), reverse
        the ledger if the drop was settled, tell the buyer. Idempotent: every path that
        sees a refund (the worker's undo, a webhook, an admin) calls it."""
        await self.db.execute(
            "UPDATE payments SET amount_refunded = GREATEST(amount_refunded, $2), "
            "updated_at = now() WHERE order_id = $1", order["id"], amount_refunded)
        if full:
            await self.move(order, S.REFUNDED)
        if self.on_refunded is not None:
            await self.on_refunded(order["drop_id"])
        await self.tell(order)

    # -- release -----------------------------------------------------------
    async def release(self, e: ReleaseEntry) -> None:
        order = await self.order(e.hold_id)
        target = {"expired": S.EXPIRED, "cancelled": S.CANCELLED}.get(e.reason, S.FAILED)
        if order is None:
            # The reserve entry has not been recorded (it is pending elsewhere, or it
            # was lost): record the order from Redis' hold, already released.
            order = await self._order_from_hold(e.hold_id, target)
            if order is None:
                log.warning("release of a hold known nowhere", extra={"hold_id": e.hold_id})
                return
        state = OrderState(order["state"])
        if state in OPEN_STATES:
            await self.move(order, target)
        elif state in (S.PAID, S.DISPUTED) and not order["released"]:
            # Redis released a hold PostgreSQL has as paid (Redis lost the "paid" mark):
            # its units went back on sale, so the money goes back too.
            log.warning("a paid order's hold was released in Redis: refunding",
                        extra={"order_id": e.hold_id, "reason": e.reason})
            await self.db.execute("UPDATE orders SET released = $2 WHERE id = $1",
                                  order["id"], target.value)
        await self.undo_payment(order)
        await self.tell(order)

    async def undo_payment(self, order: Mapping[str, Any]) -> None:
        """Cancel or refund the order's payment if its hold is released."""
        state, released = await self.state_of(order["id"])
        if state not in RELEASED_STATES and not released:
            return
        intent_id = await self.db.fetchval(
            "SELECT intent_id FROM payments WHERE order_id = $1", order["id"])
        if state is S.REFUNDED:
            return
        if intent_id is None:
            asked = await self._intent_asked_for(order)
            if asked is None:
                return  # never charged
            intent_id = asked.id
        intent = await self.gateway.retrieve_intent(intent_id)
        await self.record_intent(intent)
        await self.undo(order, intent)

    async def _intent_asked_for(self, order: Mapping[str, Any]) -> Intent | None:
        """The intent the gateway was asked for before its payments row was written (a
        crash or an outage between), recorded now; None if it was never asked for.
        Asking again with the same idempotency key returns it, never a second one."""
        row = await self.db.fetchrow(
            f"SELECT {_COLS}, idempotency_key, payment_requested FROM orders WHERE id = $1",
            order["id"])
        if row is None or not row["payment_requested"]:
            return None
        e = ReserveEntry(
            hold_id=row["public_id"], drop_id=row["drop_id"], product_id=row["product_id"],
            user_id=row["user_id"], quantity=row["quantity"],
            buyer_number=row["buyer_number"], unit_price=row["unit_price"],
            amount=row["amount"], currency=row["currency"].strip().lower(),
            idempotency_key=row["idempotency_key"],
            expires_at_ms=int(row["hold_expires_at"].timestamp() * 1000),
            flow=Flow(row["payment_flow"]))
        intent = await self._create_intent(row, e)
        await self._record_payment(row, e, intent)
        return intent

    async def _order_from_hold(self, hold_id: str,
                               state: OrderState) -> asyncpg.Record | None:
        from checkout import holds

        record = await holds.get_hold(self.redis, hold_id)
        if record is None:
            return None
        return await self.record_order(record, state=state)
