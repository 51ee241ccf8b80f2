"""The drop lifecycle as a pure state machine: no I/O, no clock.

A drop moves ``draft -> scheduled -> live -> selling -> sold_out / closed -> ended ->
settled``. While it is on air the creator drops several products one after another,
so ``sold_out`` and ``closed`` lead back to ``selling`` with BUY NOW for the next
product. After the end the creator may keep selling on the replay (``ended ->
replay -> ended``): the products dropped during the live that have units left go on
sale again, all at once, until the creator ends that too; only then can the drop be
settled. Each product has a smaller machine of its own (:class:`ProductState`).

:func:`transition` is the only way a state changes; an action that is not in
:data:`TRANSITIONS` raises :class:`IllegalTransition`, which the HTTP layer answers
with ``409 illegal_transition``. The table is documented in docs/topics/lifecycle.md;
keep the two in step. The state strings are the CHECK constraint of ``drops.state``
and ``drop_products.state`` in schema.sql.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from dropserver.errors import Conflict

__all__ = [
    "EDITABLE",
    "ON_AIR",
    "PINNABLE",
    "PRODUCT_TRANSITIONS",
    "STOCK_IN_REDIS",
    "TARGET",
    "TRANSITIONS",
    "Action",
    "DropState",
    "IllegalTransition",
    "ProductState",
    "WrongState",
    "allowed_actions",
    "product_transition",
    "require_state",
    "transition",
]


class DropState(enum.StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    LIVE = "live"
    SELLING = "selling"
    SOLD_OUT = "sold_out"
    CLOSED = "closed"
    ENDED = "ended"
    REPLAY = "replay"        # ended, still selling what is left on the replay page
    SETTLED = "settled"


class ProductState(enum.StrEnum):
    PENDING = "pending"
    SELLING = "selling"
    SOLD_OUT = "sold_out"
    CLOSED = "closed"


class Action(enum.StrEnum):
    SCHEDULE = "schedule"    # creator: set the countdown target
    GO_LIVE = "go_live"      # creator: on air, stock pre-warmed into Redis
    BUY_NOW = "buy_now"      # creator: open sales of one product
    SOLD_OUT = "sold_out"    # system: the selling product's stock reached 0
    RESTOCK = "restock"      # system: released holds put a sold-out product back on sale
    CLOSE = "close"          # creator: stop selling the current product
    END = "end"              # creator: off air; any open sales close (also replay sales)
    SELL_REPLAY = "sell_replay"  # creator: after the end, sell what is left on the replay
    SETTLE = "settle"        # settlement: ledger written, payouts made


S = DropState
A = Action

# (current state, action) -> next state. Anything else is illegal.
TRANSITIONS: Mapping[tuple[DropState, Action], DropState] = MappingProxyType({
    (S.DRAFT, A.SCHEDULE): S.SCHEDULED,
    (S.SCHEDULED, A.GO_LIVE): S.LIVE,
    (S.LIVE, A.BUY_NOW): S.SELLING,
    (S.LIVE, A.END): S.ENDED,
    (S.SELLING, A.SOLD_OUT): S.SOLD_OUT,
    (S.SELLING, A.CLOSE): S.CLOSED,
    (S.SELLING, A.END): S.ENDED,
    (S.SOLD_OUT, A.BUY_NOW): S.SELLING,     # the next product
    (S.SOLD_OUT, A.RESTOCK): S.SELLING,     # the same product, units released
    (S.SOLD_OUT, A.CLOSE): S.CLOSED,
    (S.SOLD_OUT, A.END): S.ENDED,
    (S.CLOSED, A.BUY_NOW): S.SELLING,       # the next product
    (S.CLOSED, A.END): S.ENDED,
    (S.ENDED, A.SELL_REPLAY): S.REPLAY,     # the replay page sells what is left
    (S.REPLAY, A.END): S.ENDED,             # replay sales close
    (S.ENDED, A.SETTLE): S.SETTLED,
})

# The state each action aims at, for error messages ("draft -> selling").
TARGET: Mapping[Action, DropState] = MappingProxyType({
    A.SCHEDULE: S.SCHEDULED,
    A.GO_LIVE: S.LIVE,
    A.BUY_NOW: S.SELLING,
    A.SOLD_OUT: S.SOLD_OUT,
    A.RESTOCK: S.SELLING,
    A.CLOSE: S.CLOSED,
    A.END: S.ENDED,
    A.SETTLE: S.SETTLED,
    A.SELL_REPLAY: S.REPLAY,
})

# Not transitions, but only legal in some states: editing the drop and its products,
# and pinning a product (a pin is shown during the countdown too).
EDITABLE: frozenset[DropState] = frozenset({S.DRAFT, S.SCHEDULED})
PINNABLE: frozenset[DropState] = frozenset(
    {S.SCHEDULED, S.LIVE, S.SELLING, S.SOLD_OUT, S.CLOSED})
# On air: went live and has not ended. Stock is in Redis; auctions and giveaways run.
ON_AIR: frozenset[DropState] = frozenset({S.LIVE, S.SELLING, S.SOLD_OUT, S.CLOSED})
# The drop's stock lives in Redis and may sell: on air, or selling on the replay.
STOCK_IN_REDIS: frozenset[DropState] = ON_AIR | {S.REPLAY}

P = ProductState

PRODUCT_TRANSITIONS: Mapping[tuple[ProductState, Action], ProductState] = MappingProxyType({
    (P.PENDING, A.BUY_NOW): P.SELLING,
    (P.SELLING, A.SOLD_OUT): P.SOLD_OUT,
    (P.SOLD_OUT, A.RESTOCK): P.SELLING,
    (P.SELLING, A.CLOSE): P.CLOSED,
    (P.SOLD_OUT, A.CLOSE): P.CLOSED,
    (P.SELLING, A.END): P.CLOSED,
    (P.SOLD_OUT, A.END): P.CLOSED,
    (P.CLOSED, A.SELL_REPLAY): P.SELLING,   # dropped on the live, units left
})


class IllegalTransition(Conflict):
    """``action`` is not legal in ``current``: HTTP 409 ``illegal_transition``."""

    code = "illegal_transition"

    def __init__(self, current: DropState, action: Action, message: str | None = None,
                 *, product_id: int | None = None) -> None:
        target = TARGET[action]
        details: dict[str, object] = {
            "from": current.value, "to": target.value, "action": action.value,
            "allowed": [a.value for a in allowed_actions(current)],
        }
        if product_id is not None:
            details["product_id"] = product_id
        super().__init__(
            message or f"cannot {action.value} a drop that is {current.value} "
                       f"({current.value} -> {target.value} is not a legal transition)",
            details=details)
        self.current = current
        self.action = action


def transition(current: DropState | str, action: Action | str) -> DropState:
    """The state after ``action``, or :class:`IllegalTransition`."""
    state, act = DropState(current), Action(action)
    try:
        return TRANSITIONS[(state, act)]
    except KeyError:
        raise IllegalTransition(state, act) from None


def allowed_actions(current: DropState | str) -> list[Action]:
    """The actions legal in ``current``, in table order."""
    state = DropState(current)
    return [act for (src, act) in TRANSITIONS if src is state]


def product_transition(current: ProductState | str, action: Action | str,
                       *, drop_state: DropState, product_id: int) -> ProductState:
    """The product's state after ``action``; illegal ones raise :class:`IllegalTransition`.

    ``drop_state`` is the drop's state, named in the error so the client sees why.
    """
    state, act = ProductState(current), Action(action)
    try:
        return PRODUCT_TRANSITIONS[(state, act)]
    except KeyError:
        raise IllegalTransition(
            drop_state, act,
            f"cannot {act.value} product {product_id}: it is {state.value}",
            product_id=product_id) from None


class WrongState(Conflict):
    """An operation that is not a transition (edit, pin) is not allowed in this state."""

    code = "wrong_state"

    def __init__(self, current: DropState, operation: str,
                 allowed: frozenset[DropState]) -> None:
        names = sorted(s.value for s in allowed)
        super().__init__(
            f"cannot {operation} a drop that is {current.value} "
            f"(only when {' or '.join(names)})",
            details={"state": current.value, "operation": operation, "allowed_states": names})


def require_state(current: DropState | str, allowed: frozenset[DropState],
                  operation: str) -> DropState:
    """``current`` when it is in ``allowed``, else :class:`WrongState`."""
    state = DropState(current)
    if state not in allowed:
        raise WrongState(state, operation, allowed)
    return state
