"""Stripe behind the :class:`checkout.payment_types.Gateway` protocol.

:class:`StripeGateway` uses the ``stripe`` SDK's :class:`stripe.StripeClient` and its
``*_async`` methods over httpx. Every mutating call carries an idempotency key that
the caller derives from the order (``pi:<hold id>``): stripe-python makes up a random
key per call and only reuses it for its own network retries, so a re-run job would
otherwise charge twice (https://docs.stripe.com/api/idempotent_requests). SDK errors
become :class:`GatewayError` (network, 429 and 5xx retryable); callers never see SDK
objects.
"""

from __future__ import annotations

from typing import Any

import stripe

from checkout.payment_types import (
    Charge,
    Dispute,
    Flow,
    GatewayError,
    Intent,
    IntentStatus,
    Refund,
    Transfer,
)

__all__ = ["StripeGateway"]


def _plain(obj: Any) -> Any:
    """A StripeObject as plain dicts and lists."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else obj


def _g(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` for dicts, the attribute otherwise (the SDK's ErrorObject)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    try:
        return obj[name]
    except (KeyError, TypeError):
        return getattr(obj, name, default)


def _intent_from(obj: Any) -> Intent:
    err = _g(obj, "last_payment_error")
    charge = _g(obj, "latest_charge")
    fee = 0
    capture_before = None
    charge_id = charge
    if charge is not None and not isinstance(charge, str):
        charge_id = _g(charge, "id")
        txn = _g(charge, "balance_transaction")
        if txn is not None and not isinstance(txn, str):
            fee = int(_g(txn, "fee", 0) or 0)
        card = _g(_g(charge, "payment_method_details"), "card")
        capture_before = _g(card, "capture_before")
    method = _g(obj, "capture_method") or "automatic"
    meta = _g(obj, "metadata") or {}
    return Intent(
        id=_g(obj, "id"), status=IntentStatus(_g(obj, "status")),
        amount=int(_g(obj, "amount")), currency=_g(obj, "currency"),
        capture_method="manual" if method == "manual" else "automatic",
        amount_received=int(_g(obj, "amount_received", 0) or 0),
        client_secret=_g(obj, "client_secret"), latest_charge=charge_id, fee=fee,
        capture_before=capture_before,
        error_code=_g(err, "code"), error_message=_g(err, "message"),
        transfer_group=_g(obj, "transfer_group"),
        metadata={str(k): str(v) for k, v in dict(meta).items()},
    )


class StripeGateway:
    """Stripe through ``stripe.StripeClient`` (async httpx transport)."""

    name = "stripe"

    def __init__(self, api_key: str, *, api_base: str = "", timeout: float = 20.0,
                 max_network_retries: int = 2) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout)
        kwargs: dict[str, Any] = {"http_client": self._http,
                                  "max_network_retries": max_network_retries}
        if api_base:
            kwargs["base_addresses"] = {"api": api_base}
        self.client = stripe.StripeClient(api_key, **kwargs)

    async def _call(self, coro: Any) -> Any:
        try:
            return _plain(await coro)
        except stripe.CardError as exc:
            pi = _g(exc.error, "payment_intent")
            if pi is not None:
                return _plain(pi)  # a decline: the intent carries last_payment_error
            raise GatewayError(str(exc), code=exc.code or "card_error") from exc
        except stripe.IdempotencyError as exc:
            raise GatewayError(str(exc), code="idempotency_error") from exc
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise GatewayError(str(exc), code="unavailable", retryable=True) from exc
        except stripe.APIError as exc:
            raise GatewayError(str(exc), code="gateway_error",
                               retryable=(exc.http_status or 500) >= 500) from exc
        except stripe.InvalidRequestError as exc:
            raise GatewayError(str(exc), code=exc.code or "invalid_request") from exc
        except stripe.StripeError as exc:
            status = exc.http_status or 0
            raise GatewayError(str(exc), code=exc.code or "stripe_error",
                               retryable=status >= 500 or status == 0) from exc

    async def create_intent(self, *, amount: int, currency: str, idempotency_key: str,
                            flow: Flow, capture_manual: bool = False,
                            payment_method: str | None = None, customer: str | None = None,
                            transfer_group: str | None = None,
                            metadata: dict[str, str] | None = None) -> Intent:
        params: dict[str, Any] = {"amount": amount, "currency": currency,
                                  "metadata": metadata or {}}
        if capture_manual:
            params["capture_method"] = "manual"
        if transfer_group:
            params["transfer_group"] = transfer_group
        if customer:
            params["customer"] = customer
        if payment_method:
            params["payment_method"] = payment_method
        if flow is Flow.OFF_SESSION or (flow is Flow.MANUAL_CAPTURE and payment_method):
            # https://docs.stripe.com/payments/save-and-reuse#charge-saved-payment-method
            params["confirm"] = True
            params["off_session"] = True
        obj = await self._call(self.client.v1.payment_intents.create_async(
            params, options={"idempotency_key": idempotency_key}))
        if _g(obj, "latest_charge"):  # read the fee from the balance transaction
            return await self.retrieve_intent(_g(obj, "id"))
        return _intent_from(obj)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        obj = await self._call(self.client.v1.payment_intents.retrieve_async(
            intent_id, {"expand": ["latest_charge.balance_transaction"]}))
        return _intent_from(obj)

    async def capture_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        await self._call(self.client.v1.payment_intents.capture_async(
            intent_id, options={"idempotency_key": idempotency_key}))
        return await self.retrieve_intent(intent_id)

    async def cancel_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        obj = await self._call(self.client.v1.payment_intents.cancel_async(
            intent_id, options={"idempotency_key": idempotency_key}))
        return _intent_from(obj)

    async def refund(self, intent_id: str, *, idempotency_key: str,
                     amount: int | None = None) -> Refund:
        params: dict[str, Any] = {"payment_intent": intent_id}
        if amount is not None:
            params["amount"] = amount
        obj = await self._call(self.client.v1.refunds.create_async(
            params, options={"idempotency_key": idempotency_key}))
        return Refund(id=_g(obj, "id"), amount=int(_g(obj, "amount")),
                      payment_intent=_g(obj, "payment_intent"))

    async def retrieve_charge(self, charge_id: str) -> Charge:
        obj = await self._call(self.client.v1.charges.retrieve_async(charge_id))
        return Charge(id=_g(obj, "id"), payment_intent=_g(obj, "payment_intent"),
                      amount_captured=int(_g(obj, "amount_captured", 0) or 0),
                      amount_refunded=int(_g(obj, "amount_refunded", 0) or 0),
                      refunded=bool(_g(obj, "refunded")), disputed=bool(_g(obj, "disputed")))

    async def retrieve_dispute(self, dispute_id: str) -> Dispute:
        obj = await self._call(self.client.v1.disputes.retrieve_async(dispute_id))
        charge = _g(obj, "charge")
        return Dispute(id=_g(obj, "id"), payment_intent=_g(obj, "payment_intent"),
                       charge=charge if isinstance(charge, str) else _g(charge, "id"),
                       status=_g(obj, "status"), amount=int(_g(obj, "amount", 0) or 0))

    async def transfer(self, *, amount: int, currency: str, destination: str,
                       transfer_group: str, idempotency_key: str,
                       metadata: dict[str, str] | None = None) -> Transfer:
        # Separate charges and transfers: https://docs.stripe.com/connect/separate-charges-and-transfers
        obj = await self._call(self.client.v1.transfers.create_async(
            {"amount": amount, "currency": currency, "destination": destination,
             "transfer_group": transfer_group, "metadata": metadata or {}},
            options={"idempotency_key": idempotency_key}))
        return Transfer(id=_g(obj, "id"), amount=int(_g(obj, "amount")),
                        destination=_g(obj, "destination"),
                        transfer_group=_g(obj, "transfer_group"))

    async def close(self) -> None:
        await self._http.close_async()
