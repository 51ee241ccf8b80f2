"""What a buyer hears about an order: the events' payloads, each published once.

:meth:`checkout.orders.OrderProcessor.tell` decides *when* (each state once per order);
this module says *what*: the body of ``order.payment``, ``order.paid``,
``order.failed``, ``order.expired``, ``order.cancelled`` and ``order.refunded``
(docs/http-api.md), and the publish that carries a Redis marker set in the same atomic
step (``tell.lua``), so a re-run after a crash sends nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from checkout.order_states import OrderState
from checkout.payment_types import Intent, IntentStatus

__all__ = ["TOLD_TTL_S", "event_data", "publish_user", "publish_user_once"]

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
    order's state from ``GET /v1/orders/{id}``), never told twice."""
    from checkout.scripts import script
    from dropserver.redis_client import is_cluster
    from realtime.publish import user_message

    channel, message = user_message(user_id, event, data)
    if is_cluster(redis):
        if not await redis.set(marker, b"1", ex=TOLD_TTL_S, nx=True):
            return False
        await redis.spublish(channel, message)
        return True
    return bool(await script("tell")(keys=[marker], args=[channel, message, TOLD_TTL_S],
                                     client=redis))


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
        return {"amount": row["amount_received"], "currency": (row["currency"] or "").strip()}
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
