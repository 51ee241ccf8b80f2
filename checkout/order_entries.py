"""Order stream entries (``{drop:<id>}:orders``, written by the reservation scripts) as
typed values, and the identifiers an order derives from its hold. Pure: no I/O.

The format is documented in docs/topics/checkout.md ("The order stream").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from checkout.payment_types import Flow

__all__ = ["BadEntry", "ReleaseEntry", "ReserveEntry", "fields_text", "intent_key",
           "parse_entry", "transfer_group"]


class BadEntry(ValueError):
    """An order stream entry that can never be processed."""


@dataclass(frozen=True, slots=True)
class ReserveEntry:
    hold_id: str
    drop_id: int
    product_id: int
    user_id: str
    quantity: int
    buyer_number: int
    unit_price: int
    amount: int
    currency: str
    idempotency_key: str
    expires_at_ms: int
    flow: Flow
    created_at_ms: int = 0  # Redis' clock when the hold was made (0: not said)
    variant_id: int | None = None  # the variant bought (None: no variants)


@dataclass(frozen=True, slots=True)
class ReleaseEntry:
    hold_id: str
    drop_id: int
    reason: str


def fields_text(fields: Mapping[Any, Any]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = (
            v.decode() if isinstance(v, bytes) else str(v))
    return out


def parse_entry(fields: Mapping[Any, Any]) -> ReserveEntry | ReleaseEntry:
    """One stream entry's fields (bytes or str) as a typed entry, or :class:`BadEntry`."""
    f = fields_text(fields)

    def integer(name: str, minimum: int = 0) -> int:
        try:
            value = int(f[name])
        except (KeyError, ValueError):
            raise BadEntry(f"{name} missing or not an integer") from None
        if value < minimum:
            raise BadEntry(f"{name} must be >= {minimum}")
        return value

    def text(name: str) -> str:
        value = f.get(name, "")
        if not value:
            raise BadEntry(f"{name} missing")
        return value

    kind = f.get("type")
    if kind == "release":
        return ReleaseEntry(hold_id=text("hold_id"), drop_id=integer("drop_id", 1),
                            reason=f.get("reason") or "expired")
    if kind != "reserve":
        raise BadEntry(f"unknown entry type {kind!r}")
    try:
        flow = Flow(f.get("flow") or Flow.CLIENT_CONFIRM.value)
    except ValueError:
        raise BadEntry(f"unknown flow {f.get('flow')!r}") from None
    entry = ReserveEntry(
        hold_id=text("hold_id"), drop_id=integer("drop_id", 1),
        product_id=integer("product_id", 1), user_id=text("user_id"),
        quantity=integer("quantity", 1), buyer_number=integer("buyer_number", 1),
        # 0: a giveaway's prize (checkout/prizes.py), recorded with no PaymentIntent
        unit_price=integer("unit_price", 0), amount=integer("amount", 0),
        currency=text("currency").lower(), idempotency_key=text("idempotency_key"),
        expires_at_ms=integer("expires_at", 0), flow=flow,
        created_at_ms=integer("created_at", 0) if f.get("created_at") else 0,
        variant_id=integer("variant_id", 1) if f.get("variant_id") else None,
    )
    if entry.amount != entry.unit_price * entry.quantity:
        raise BadEntry("amount is not unit_price * quantity")
    if len(entry.currency) != 3:
        raise BadEntry("currency must be a 3-letter code")
    return entry


def intent_key(hold_id: str) -> str:
    """The idempotency key of an order's PaymentIntent: fixed by the order."""
    return f"pi:{hold_id}"


def transfer_group(drop_id: int) -> str:
    """One Connect transfer group per drop (payouts join it at settlement)."""
    return f"drop_{int(drop_id)}"
