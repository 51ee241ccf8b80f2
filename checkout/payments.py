"""The payment gateway interface, Stripe behind it, and a deterministic fake.

Everything that moves money goes through :class:`Gateway`. Two implementations:

* :class:`StripeGateway` uses the ``stripe`` SDK's :class:`stripe.StripeClient` and its
  ``*_async`` methods over httpx. Every mutating call carries an idempotency key that
  the caller derives from the order (``pi:<hold id>``): stripe-python makes up a random
  key per call and only reuses it for its own network retries, so a re-run job would
  otherwise charge twice (https://docs.stripe.com/api/idempotent_requests).
* :class:`FakeGateway` keeps intents in Redis (shared by the workers) or in memory and
  answers by test payment method, like
  Stripe's test cards: ``pm_card_visa`` succeeds, ``pm_card_chargeDeclined`` declines,
  ``pm_card_slow`` succeeds after :attr:`FakeGateway.slow_seconds`. It serves
  ``dropserver dev`` and the load tests (``DROPSERVER_PAYMENT_GATEWAY=fake``).

Both return plain :class:`Intent` values; callers never see SDK objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import stripe

from dropserver.settings import Settings

__all__ = [
    "AUTHORIZATION_WINDOW_SECONDS",
    "Charge",
    "Dispute",
    "FakeGateway",
    "Gateway",
    "GatewayError",
    "Intent",
    "IntentStatus",
    "MemoryStore",
    "RedisStore",
    "Refund",
    "StripeGateway",
    "Transfer",
    "create_gateway",
]

log = logging.getLogger("dropserver.payments")

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


# ---------------------------------------------------------------------------
# the fake
# ---------------------------------------------------------------------------
FAKE_FEE_BPS = 290   # 2.9% + 30, like a card in the US
FAKE_FEE_FIXED = 30


def fake_fee(amount: int) -> int:
    return (amount * FAKE_FEE_BPS + 5000) // 10000 + FAKE_FEE_FIXED


class MemoryStore:
    """The fake gateway's objects in this process (unit tests, benchmarks)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}

    async def get(self, kind: str, key: str) -> Any:
        return self._data.get(kind, {}).get(key)

    async def put(self, kind: str, key: str, value: Any) -> None:
        self._data.setdefault(kind, {})[key] = value

    async def values(self, kind: str) -> list[Any]:
        return list(self._data.get(kind, {}).values())


class RedisStore:
    """The fake gateway's objects in Redis, shared by every worker process as Stripe's
    are: an order retried by another worker (a re-claimed stream entry) finds the
    PaymentIntent the first one made."""

    def __init__(self, redis: Any, prefix: str = "fakepay") -> None:
        self.redis = redis
        self.prefix = prefix

    async def get(self, kind: str, key: str) -> Any:
        raw = await self.redis.hget(f"{self.prefix}:{kind}", key)
        return None if raw is None else json.loads(raw)

    async def put(self, kind: str, key: str, value: Any) -> None:
        await self.redis.hset(f"{self.prefix}:{kind}", key, json.dumps(value))

    async def values(self, kind: str) -> list[Any]:
        return [json.loads(v) for v in await self.redis.hvals(f"{self.prefix}:{kind}")]


class FakeGateway:
    """Deterministic gateway with the same interface and idempotency rules as Stripe.

    Objects live in a :class:`MemoryStore` by default, or in Redis
    (:class:`RedisStore`, what the server uses) so every worker sees the same ones.
    Test cards: ``pm_card_chargeDeclined`` declines, ``pm_card_slow`` takes
    ``slow_seconds``; any other payment method succeeds."""

    name = "fake"

    def __init__(self, *, slow_seconds: float = 2.0, store: Any = None) -> None:
        self.slow_seconds = slow_seconds
        self.store = store if store is not None else MemoryStore()
        self.calls: dict[str, int] = {}

    async def _replay(self, key: str, params: dict[str, Any]) -> tuple[bool, Any]:
        seen = await self.store.get("idem", key)
        if seen is None:
            return False, None
        if seen[0] != json.dumps(params, sort_keys=True, default=str):
            raise GatewayError("idempotency key reused with different parameters",
                               code="idempotency_error")
        return True, seen[1]

    async def _remember(self, key: str, params: dict[str, Any], result: Any) -> None:
        await self.store.put("idem", key, [json.dumps(params, sort_keys=True, default=str),
                                           result])

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _intent(self, pi: dict[str, Any]) -> Intent:
        return Intent(
            id=pi["id"], status=IntentStatus(pi["status"]), amount=pi["amount"],
            currency=pi["currency"], capture_method=pi["capture_method"],
            amount_received=pi["amount_received"], client_secret=pi["client_secret"],
            latest_charge=pi["charge"], fee=pi["fee"], capture_before=pi["capture_before"],
            error_code=pi["error_code"], error_message=pi["error_message"],
            transfer_group=pi["transfer_group"], metadata=dict(pi["metadata"]),
        )

    async def _confirm(self, pi: dict[str, Any], pm: str) -> None:
        if pi["status"] not in (IntentStatus.REQUIRES_PAYMENT_METHOD,
                                IntentStatus.REQUIRES_CONFIRMATION,
                                IntentStatus.REQUIRES_ACTION):
            raise GatewayError(f"cannot confirm a {pi['status']} intent",
                               code="payment_intent_unexpected_state")
        if pm == "pm_card_slow":
            await asyncio.sleep(self.slow_seconds)
        if pm == "pm_card_chargeDeclined":
            pi.update(status=IntentStatus.REQUIRES_PAYMENT_METHOD.value,
                      error_code="card_declined", error_message="Your card was declined.")
        else:
            pi["charge"] = "ch_fake_" + pi["id"][8:]
            if pi["capture_method"] == "manual":
                pi.update(status=IntentStatus.REQUIRES_CAPTURE.value,
                          capture_before=int(time.time()) + AUTHORIZATION_WINDOW_SECONDS)
            else:
                pi.update(status=IntentStatus.SUCCEEDED.value, amount_received=pi["amount"],
                          fee=fake_fee(pi["amount"]))
        await self.store.put("intent", pi["id"], pi)

    async def create_intent(self, *, amount: int, currency: str, idempotency_key: str,
                            flow: Flow, capture_manual: bool = False,
                            payment_method: str | None = None, customer: str | None = None,
                            transfer_group: str | None = None,
                            metadata: dict[str, str] | None = None) -> Intent:
        params = {"amount": amount, "currency": currency, "flow": str(flow),
                  "capture_manual": capture_manual, "payment_method": payment_method,
                  "customer": customer, "transfer_group": transfer_group,
                  "metadata": metadata or {}}
        seen, result = await self._replay(idempotency_key, params)
        if seen:
            return self._intent(await self._get(result))
        self._count("create_intent")
        # Deterministic id from the key: a second process asked again finds the same id.
        pid = "pi_fake_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
        pi: dict[str, Any] = {
            "id": pid, "status": IntentStatus.REQUIRES_PAYMENT_METHOD.value,
            "amount": amount, "currency": currency,
            "capture_method": "manual" if capture_manual else "automatic",
            "amount_received": 0, "client_secret": f"{pid}_secret_fake", "charge": None,
            "fee": 0, "capture_before": None, "error_code": None, "error_message": None,
            "transfer_group": transfer_group, "metadata": dict(metadata or {}),
            "refunded": 0,
        }
        await self.store.put("intent", pid, pi)
        await self._remember(idempotency_key, params, pid)
        confirm = flow is Flow.OFF_SESSION or (flow is Flow.MANUAL_CAPTURE and payment_method)
        if confirm:
            await self._confirm(pi, payment_method or "")
        return self._intent(pi)

    async def _get(self, intent_id: str) -> dict[str, Any]:
        pi = await self.store.get("intent", intent_id)
        if pi is None:
            raise GatewayError(f"no such payment intent {intent_id}", code="resource_missing")
        return pi

    async def confirm_as_buyer(self, intent_id: str, payment_method: str) -> Intent:
        """What Stripe.js would do with the client secret (dev and tests)."""
        pi = await self._get(intent_id)
        await self._confirm(pi, payment_method)
        return self._intent(pi)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return self._intent(await self._get(intent_id))

    async def capture_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        seen, _ = await self._replay(idempotency_key, {"capture": intent_id})
        pi = await self._get(intent_id)
        if seen:
            return self._intent(pi)
        if pi["status"] != IntentStatus.REQUIRES_CAPTURE:
            raise GatewayError(f"cannot capture a {pi['status']} intent",
                               code="payment_intent_unexpected_state")
        self._count("capture_intent")
        pi.update(status=IntentStatus.SUCCEEDED.value, amount_received=pi["amount"],
                  fee=fake_fee(pi["amount"]))
        await self.store.put("intent", intent_id, pi)
        await self._remember(idempotency_key, {"capture": intent_id}, intent_id)
        return self._intent(pi)

    async def cancel_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        seen, _ = await self._replay(idempotency_key, {"cancel": intent_id})
        pi = await self._get(intent_id)
        if seen:
            return self._intent(pi)
        if pi["status"] in (IntentStatus.SUCCEEDED, IntentStatus.CANCELED,
                            IntentStatus.PROCESSING):
            raise GatewayError(f"cannot cancel a {pi['status']} intent",
                               code="payment_intent_unexpected_state")
        self._count("cancel_intent")
        pi["status"] = IntentStatus.CANCELED.value
        await self.store.put("intent", intent_id, pi)
        await self._remember(idempotency_key, {"cancel": intent_id}, intent_id)
        return self._intent(pi)

    async def refund(self, intent_id: str, *, idempotency_key: str,
                     amount: int | None = None) -> Refund:
        params = {"refund": intent_id, "amount": amount}
        seen, result = await self._replay(idempotency_key, params)
        if seen:
            return Refund(**await self.store.get("refund", result))
        pi = await self._get(intent_id)
        left = pi["amount_received"] - pi["refunded"]
        amt = left if amount is None else amount
        if pi["status"] != IntentStatus.SUCCEEDED or amt < 1 or amt > left:
            raise GatewayError("nothing to refund", code="charge_not_refundable")
        self._count("refund")
        pi["refunded"] += amt
        await self.store.put("intent", intent_id, pi)
        ref = Refund(id="re_fake_" + secrets.token_hex(8), amount=amt, payment_intent=pi["id"])
        await self.store.put("refund", ref.id, dataclasses.asdict(ref))
        await self._remember(idempotency_key, params, ref.id)
        return ref

    async def retrieve_charge(self, charge_id: str) -> Charge:
        pi = await self.store.get("intent", "pi_fake_" + charge_id[8:]) \
            if charge_id.startswith("ch_fake_") else None
        if pi is None or pi["charge"] != charge_id:
            raise GatewayError(f"no such charge {charge_id}", code="resource_missing")
        return Charge(id=charge_id, payment_intent=pi["id"],
                      amount_captured=pi["amount_received"],
                      amount_refunded=pi["refunded"],
                      refunded=pi["refunded"] >= pi["amount_received"] > 0,
                      disputed=False)

    async def retrieve_dispute(self, dispute_id: str) -> Dispute:
        raise GatewayError("the fake gateway has no disputes", code="resource_missing")

    async def transfer(self, *, amount: int, currency: str, destination: str,
                       transfer_group: str, idempotency_key: str,
                       metadata: dict[str, str] | None = None) -> Transfer:
        params = {"amount": amount, "currency": currency, "destination": destination,
                  "transfer_group": transfer_group, "metadata": metadata or {}}
        seen, result = await self._replay(idempotency_key, params)
        if seen:
            return Transfer(**await self.store.get("transfer", result))
        self._count("transfer")
        tr = Transfer(id="tr_fake_" + secrets.token_hex(8), amount=amount,
                      destination=destination, transfer_group=transfer_group)
        await self.store.put("transfer", tr.id, dataclasses.asdict(tr))
        await self._remember(idempotency_key, params, tr.id)
        return tr

    async def close(self) -> None:
        return None


def create_gateway(settings: Settings, redis: Any = None) -> Gateway:
    """The gateway ``DROPSERVER_PAYMENT_GATEWAY`` names; the fake one keeps its objects
    in ``redis`` when given (shared by the worker processes)."""
    if settings.payment_gateway == "stripe":
        return StripeGateway(settings.stripe_api_key, api_base=settings.stripe_api_base)
    return FakeGateway(store=RedisStore(redis) if redis is not None else None)
