"""Refunding a payment in full: the one way an order and a tip are both refunded.

:func:`refund_in_full` asks the gateway for the refund under the caller's idempotency
key and answers the charge as the gateway has it afterwards. A charge refunded already
(by another path -- the creator's refund, a webhook's, a retry whose answer was lost)
is not an error: its current state is the answer, so every caller records the same
amounts whichever path got there first. The caller records them
(:meth:`checkout.orders.OrderProcessor.record_refund`,
:meth:`checkout.tips.Tips.record_refund`).
"""

from __future__ import annotations

from checkout.payment_types import Charge, Gateway, GatewayError, Intent

__all__ = ["refund_in_full"]


async def refund_in_full(gateway: Gateway, intent: Intent, *, key: str) -> Charge:
    """Refund the whole of ``intent``'s charge (idempotency key ``key``, e.g.
    ``refund:<order id>``); the charge after it. Other gateway errors are raised."""
    try:
        await gateway.refund(intent.id, idempotency_key=key)
    except GatewayError as exc:
        if exc.code != "charge_already_refunded":
            raise
    return await gateway.retrieve_charge(intent.latest_charge or "")
