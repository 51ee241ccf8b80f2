"""Order states (``orders.state``): the transitions allowed, and what a PaymentIntent
status means for an order. Pure: no I/O.

``held -> payment_pending | authorized | paid | failed | expired | cancelled``;
``payment_pending -> authorized | paid | failed | expired | cancelled``;
``authorized -> paid | failed | expired | cancelled``; ``paid -> refunded | disputed``;
``disputed -> paid | refunded``; and ``expired | cancelled | failed -> refunded``: a
payment that succeeded after its hold was released is refunded, and the order says so.

``orders.released`` keeps why a hold's units went back to stock (expired, cancelled,
failed); a ``refunded`` order keeps it, so "does this order hold units?"
(:func:`holds_units`) is answered by the row alone -- recovery and the reconciler rebuild
Redis' stock from it.
"""

from __future__ import annotations

import enum

from checkout.payment_types import Flow, Intent, IntentStatus

__all__ = ["OPEN_STATES", "OUTCOMES", "RELEASED_STATES", "OrderState", "can_transition",
           "event_for", "holds_units", "sources_of", "state_for_intent"]


class OrderState(enum.StrEnum):
    """``orders.state`` (schema.sql)."""

    HELD = "held"
    PAYMENT_PENDING = "payment_pending"
    AUTHORIZED = "authorized"
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"
    DISPUTED = "disputed"


S = OrderState
_NEXT: dict[OrderState, frozenset[OrderState]] = {
    S.HELD: frozenset({S.PAYMENT_PENDING, S.AUTHORIZED, S.PAID, S.FAILED, S.EXPIRED,
                       S.CANCELLED}),
    S.PAYMENT_PENDING: frozenset({S.AUTHORIZED, S.PAID, S.FAILED, S.EXPIRED, S.CANCELLED}),
    S.AUTHORIZED: frozenset({S.PAID, S.FAILED, S.EXPIRED, S.CANCELLED}),
    S.PAID: frozenset({S.REFUNDED, S.DISPUTED}),
    S.DISPUTED: frozenset({S.PAID, S.REFUNDED}),
    S.FAILED: frozenset({S.REFUNDED}),
    S.EXPIRED: frozenset({S.REFUNDED}),
    S.CANCELLED: frozenset({S.REFUNDED}),
    S.REFUNDED: frozenset(),
}
OPEN_STATES = frozenset({S.HELD, S.PAYMENT_PENDING, S.AUTHORIZED})
# The hold's units went back to stock (``orders.released`` says which).
RELEASED_STATES = frozenset({S.EXPIRED, S.CANCELLED, S.FAILED})
# What the buyer must hear once each (``orders.told``): the pending payment, then an end.
OUTCOMES = frozenset({S.PAYMENT_PENDING, S.AUTHORIZED, S.PAID, S.FAILED, S.EXPIRED,
                      S.CANCELLED, S.REFUNDED})


def holds_units(state: OrderState | str, released: str | None) -> bool:
    """Whether an order's units are sold or held (not back in stock)."""
    return OrderState(state) not in RELEASED_STATES and not released


def can_transition(current: OrderState, target: OrderState) -> bool:
    return target in _NEXT[current]


def sources_of(target: OrderState) -> list[str]:
    """The states an order may move to ``target`` from."""
    return [s.value for s, nxt in _NEXT.items() if target in nxt]


def state_for_intent(intent: Intent, flow: Flow) -> OrderState:
    """The order state a PaymentIntent's status means.

    A client-confirmed payment whose card was declined stays ``payment_pending``: the
    buyer may try another card with the same client secret until the hold lapses.
    A saved-card (off-session) decline fails the order."""
    status = intent.status
    if status is IntentStatus.SUCCEEDED:
        return S.PAID
    if status is IntentStatus.REQUIRES_CAPTURE:
        return S.AUTHORIZED
    if status is IntentStatus.CANCELED:
        return S.CANCELLED
    if intent.declined and flow is not Flow.CLIENT_CONFIRM:
        return S.FAILED
    return S.PAYMENT_PENDING


def event_for(state: OrderState) -> str | None:
    return {
        S.PAYMENT_PENDING: "order.payment", S.AUTHORIZED: "order.payment",
        S.PAID: "order.paid", S.FAILED: "order.failed", S.EXPIRED: "order.expired",
        S.CANCELLED: "order.cancelled", S.REFUNDED: "order.refunded",
    }.get(state)
