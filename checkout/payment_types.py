"""Payment types: what the order pipeline and a payment service provider exchange.

Pure values and the :class:`Gateway` protocol, no I/O: PaymentIntent statuses and
payment flows, :class:`Intent`, :class:`Charge`, :class:`Dispute`, :class:`Refund`,
:class:`Transfer`, and :class:`GatewayError` with its ``retryable`` flag. The two
gateways implementing the protocol are :mod:`checkout.stripe_gateway` and
:mod:`checkout.fake_gateway`; :func:`checkout.payments.create_gateway` picks one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "AUTHORIZATION_WINDOW_SECONDS",
    "Charge",
    "Dispute",
    "Flow",
    "Gateway",
    "GatewayError",
    "Intent",
    "IntentStatus",
    "Refund",
    "Transfer",
]

# An uncaptured PaymentIntent is cancelled 7 days after creation (Visa
# merchant-initiated: 5 days). https://docs.stripe.com/payments/place-a-hold-on-a-payment-method
AUTHORIZATION_WINDOW_SECONDS = 7 * 24 * 3600


class IntentStatus(enum.StrEnum):
    """PaymentIntent.status (https://docs.stripe.com/payments/paymentintents/lifecycle)."""

    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    CANCELED = "canceled"
    SUCCEEDED = "succeeded"


class Flow(enum.StrEnum):
    """How the buyer pays (orders.payment_flow)."""

    CLIENT_CONFIRM = "client_confirm"  # client secret to Stripe.js
    OFF_SESSION = "off_session"        # one tap: charge the saved card now
    MANUAL_CAPTURE = "manual_capture"  # campaign: authorize now, capture at the deadline


class GatewayError(Exception):
    """The gateway could not answer. ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, code: str = "gateway_error",
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    status: IntentStatus
    amount: int
    currency: str
    capture_method: str = "automatic"
    amount_received: int = 0
    client_secret: str | None = None
    latest_charge: str | None = None
    fee: int = 0                                  # gateway fee of the captured charge
    capture_before: int | None = None             # unix seconds (manual capture)
    error_code: str | None = None                 # last_payment_error.code
    error_message: str | None = None
    transfer_group: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def declined(self) -> bool:
        return self.status is IntentStatus.REQUIRES_PAYMENT_METHOD and bool(self.error_code)


@dataclass(frozen=True, slots=True)
class Charge:
    id: str
    payment_intent: str | None
    amount_captured: int
    amount_refunded: int
    refunded: bool
    disputed: bool


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    payment_intent: str | None
    charge: str | None
    status: str
    amount: int


@dataclass(frozen=True, slots=True)
class Refund:
    id: str
    amount: int
    payment_intent: str | None


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    amount: int
    destination: str
    transfer_group: str | None


class Gateway(Protocol):
    """What the order workers, webhooks, campaigns and settlement need from a PSP."""

    name: str

    async def create_intent(self, *, amount: int, currency: str, idempotency_key: str,
                            flow: Flow, capture_manual: bool = False,
                            payment_method: str | None = None, customer: str | None = None,
                            transfer_group: str | None = None,
                            metadata: dict[str, str] | None = None) -> Intent: ...

    async def retrieve_intent(self, intent_id: str) -> Intent: ...

    async def capture_intent(self, intent_id: str, *, idempotency_key: str) -> Intent: ...

    async def cancel_intent(self, intent_id: str, *, idempotency_key: str) -> Intent: ...

    async def refund(self, intent_id: str, *, idempotency_key: str,
                     amount: int | None = None) -> Refund: ...

    async def retrieve_charge(self, charge_id: str) -> Charge: ...

    async def retrieve_dispute(self, dispute_id: str) -> Dispute: ...

    async def transfer(self, *, amount: int, currency: str, destination: str,
                       transfer_group: str, idempotency_key: str,
                       metadata: dict[str, str] | None = None) -> Transfer: ...

    async def close(self) -> None: ...
