"""What a buyer hears about an order: the events' payloads, each published once.

:meth:`checkout.orders.OrderProcessor.tell` decides *when* (each state once per order);
this module says *what*: the body of ``order.payment``, ``order.paid``,
``order.failed``, ``order.expired``, ``order.cancelled`` and ``order.refunded``
(docs/http-api.md), and the publish that carries a Redis marker set in the same atomic
step (``tell.lua``), so a re-run after a crash sends nothing twice.

:class:`RecentOrders` is the hub's :class:`realtime.private.PrivateSource`: a user
channel keeps no history, so after a lost pub/sub subscription (or before a socket's
was made) the hub asks it for the current event of the user's recently changed orders,
with the body :meth:`~checkout.orders.OrderProcessor.tell` sends, and ranks each event
(``order.held`` < ``order.payment`` < its outcome < ``order.refunded``) so a socket
hears each once and never an older one after a newer.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from checkout.order_states import OUTCOMES, OrderState, event_for
from checkout.payment_types import Gateway, GatewayError, Intent, IntentStatus
from realtime.private import Current

__all__ = ["TOLD_TTL_S", "RecentOrders", "claim_marker", "event_data", "publish_user",
           "publish_user_once"]

log = logging.getLogger("dropserver.orders")

S = OrderState

async def publish_user(redis: Any, user_id: str, event: str, data: dict) -> None:
    """Contract 1: a private event to all of the buyer's sockets."""
    from realtime.publish import publish_user as _publish_user

    await _publish_user(redis, user_id, event, data)


TOLD_TTL_S = 7 * 24 * 3600  # how long Redis remembers that a buyer was told


async def publish_user_once(redis: Any, marker: str, user_id: str, event: str,
                            data: dict) -> bool:
    """``publish_user``, unless ``marker`` says it was sent already (``tell.lua``: the
    marker and the publish in one atomic step). True when published now.

    On a cluster the marker lives on the drop's shard and the user's channel on the
    user's, and a script may publish only to its own slot's shard channels: the
    marker is set (SET NX) and then the event published with SPUBLISH. A crash
    between the two leaves the buyer untold by this event (they still read the
    order's state from ``GET /v1/orders/{id}``), never told twice. The marker is
    claimed with a token of this call (:func:`claim_marker`): redis-py's cluster client
    sends a command again when its connection failed, and a SET NX whose first try
    was carried out (its reply lost with a primary that died) must not read as
    "told already", or the event would never be published."""
    from checkout.scripts import script
    from dropserver.redis_client import is_cluster
    from realtime.publish import user_message

    channel, message = user_message(user_id, event, data)
    if is_cluster(redis):
        if not await claim_marker(redis, marker, secrets.token_hex(8)):
            return False
        await redis.spublish(channel, message)
        return True
    return bool(await script("tell")(keys=[marker], args=[channel, message, TOLD_TTL_S],
                                     client=redis))


async def claim_marker(redis: Any, marker: str, token: str) -> bool:
    """Set ``marker`` to ``token`` unless it is set (``SET NX GET``, Redis 7+): True when
    this call set it -- or an earlier try of this same call did, which a client that
    sends a command again after a lost connection makes (the old value is our token)."""
    old = await redis.set(marker, token, ex=TOLD_TTL_S, nx=True, get=True)
    if old is None:
        return True
    return (old.decode() if isinstance(old, bytes) else str(old)) == token


def event_data(state: OrderState, row: Mapping[str, Any],
                intent: Intent | None) -> dict[str, Any]:
    if state in (S.PAYMENT_PENDING, S.AUTHORIZED) and intent is not None:
        data: dict[str, Any] = {"status": intent.status.value, "intent_id": intent.id,
                                "amount": intent.amount, "currency": intent.currency}
        if intent.status in (IntentStatus.REQUIRES_PAYMENT_METHOD,
                             IntentStatus.REQUIRES_CONFIRMATION,
                             IntentStatus.REQUIRES_ACTION):
            data["client_secret"] = intent.client_secret
        if intent.status is IntentStatus.REQUIRES_CAPTURE:
            data["status"] = "authorized"
        return data
    if state is S.PAID:
        # No payments row: a prize (amount 0, checkout/prizes.py).
        return {"amount": row["amount_received"] or 0,
                "currency": (row["currency"] or "").strip()}
    if state is S.FAILED:
        if row["released"] == "lost":
            return {"reason": "hold_lost", "message": "the hold was lost in a server "
                    "failure and its unit sold again; nothing was charged"}
        if row["last_error"]:
            message = (intent.error_message if intent is not None and intent.error_message
                       else "the payment failed")
            return {"reason": row["last_error"], "message": message}
        return {"reason": "processing_error", "message": "the order could not be processed"}
    if state is S.REFUNDED:
        return {"amount": row["amount_refunded"]}
    return {}


_RANKS = {"order.held": 0, "order.payment": 1, "order.paid": 3, "order.failed": 3,
          "order.expired": 3, "order.cancelled": 3, "order.refunded": 4}
RECENT_LIMIT = 5000  # orders per recovery query (a few per user)


class RecentOrders:
    """The current ``order.*`` event of users' recently changed orders (see the module
    docstring); ``db`` an asyncpg pool, ``gateway`` for a pending payment's client
    secret."""

    def __init__(self, db: Any, gateway: Gateway) -> None:
        self.db = db
        self.gateway = gateway

    def key(self, event: str, data: dict[str, Any]) -> tuple[str, int] | None:
        rank = _RANKS.get(event)
        order_id = data.get("order_id")
        if rank is None or not isinstance(order_id, str):
            return None
        if event == "order.payment" and data.get("status") == "authorized":
            rank = 2
        return order_id, rank

    async def current(self, user_ids: Sequence[str], since: float) -> list[Current]:
        rows = await self.db.fetch(
            """SELECT o.public_id, o.drop_id, o.product_id, o.user_id, o.state, o.released,
                      extract(epoch FROM o.updated_at)::float8 AS changed_at,
                      p.intent_id, p.amount_received, p.amount_refunded, p.currency,
                      p.last_error
               FROM orders o LEFT JOIN payments p ON p.order_id = o.id
               WHERE o.user_id = ANY($1::text[]) AND o.updated_at >= to_timestamp($2)
                 AND o.state = ANY($3::text[])
               ORDER BY o.updated_at LIMIT $4""",
            list(user_ids), since, [s.value for s in OUTCOMES], RECENT_LIMIT)
        found = []
        for row in rows:
            state = OrderState(row["state"])
            intent = None
            if state in (S.PAYMENT_PENDING, S.AUTHORIZED):
                if row["intent_id"] is None:
                    continue  # told once the intent exists
                try:
                    intent = await self.gateway.retrieve_intent(row["intent_id"])
                except GatewayError as exc:
                    log.warning("order.payment not recovered",
                                extra={"order_id": row["public_id"], "error": str(exc)})
                    continue
            event = event_for(state)
            assert event is not None
            body = {"order_id": row["public_id"], "drop_id": row["drop_id"],
                    "product_id": row["product_id"], **event_data(state, row, intent)}
            found.append(Current(row["user_id"], event, body, row["changed_at"]))
        return found
