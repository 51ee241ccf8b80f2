"""A deterministic payment gateway that behaves like Stripe, for dev and load tests.

:class:`FakeGateway` keeps its objects in Redis (:class:`RedisStore`, shared by every
worker process as Stripe's are) or in memory (:class:`MemoryStore`) and answers by
test payment method, like Stripe's test cards: ``pm_card_visa`` succeeds,
``pm_card_chargeDeclined`` declines, ``pm_card_slow`` succeeds after
:attr:`FakeGateway.slow_seconds`. It serves ``dropserver dev`` and the load tests
(``DROPSERVER_PAYMENT_GATEWAY=fake``) and holds to Stripe's rules:

* idempotency: the same key and parameters give the same result, other parameters
  ``idempotency_error``; two requests with one key at the same time run once (the
  second waits for the first's answer);
* every change is atomic on the object's current state (compare and set), so a
  confirm and a cancel racing each other cannot both win: a confirm of a cancelled
  intent, a cancel of a succeeded one, a capture of anything but ``requires_capture``
  answer ``payment_intent_unexpected_state``; a second full refund
  ``charge_already_refunded``
  (https://docs.stripe.com/payments/paymentintents/lifecycle);
* a slow card (``pm_card_slow``) spends its time before the confirm takes effect, as a
  network round trip would: whatever happened to the intent meanwhile wins;
* events: each change sends what Stripe's webhooks would (``payment_intent.succeeded``,
  ``.payment_failed``, ``.canceled``, ``.amount_capturable_updated``; for a refund
  ``charge.refunded`` then ``refund.created``) to the :attr:`FakeGateway.listeners`,
  retried until a listener accepts, like Stripe's deliveries (at least once, in any
  order). The server listens with its webhook handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from checkout.payment_types import (
    AUTHORIZATION_WINDOW_SECONDS,
    Charge,
    Dispute,
    Flow,
    GatewayError,
    Intent,
    IntentStatus,
    Refund,
    Transfer,
)
from dropserver.background import stop_task

__all__ = ["FakeGateway", "MemoryStore", "RedisStore", "fake_fee"]

log = logging.getLogger("dropserver.payments")

Listener = Callable[[dict[str, Any]], Awaitable[Any]]

FAKE_FEE_BPS = 290   # 2.9% + 30, like a card in the US
FAKE_FEE_FIXED = 30
_CONFIRMABLE = (IntentStatus.REQUIRES_PAYMENT_METHOD, IntentStatus.REQUIRES_CONFIRMATION,
                IntentStatus.REQUIRES_ACTION)
_CANCELLABLE = (*_CONFIRMABLE, IntentStatus.REQUIRES_CAPTURE)


def fake_fee(amount: int) -> int:
    return (amount * FAKE_FEE_BPS + 5000) // 10000 + FAKE_FEE_FIXED


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class MemoryStore:
    """The fake gateway's objects in this process (unit tests, benchmarks)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, str]] = {}

    async def get(self, kind: str, key: str) -> Any:
        raw = self._data.get(kind, {}).get(key)
        return None if raw is None else json.loads(raw)

    async def put(self, kind: str, key: str, value: Any) -> None:
        self._data.setdefault(kind, {})[key] = _dump(value)

    async def add(self, kind: str, key: str, value: Any) -> bool:
        """Store ``value`` unless ``key`` exists; True when stored."""
        table = self._data.setdefault(kind, {})
        if key in table:
            return False
        table[key] = _dump(value)
        return True

    async def delete(self, kind: str, key: str) -> None:
        self._data.get(kind, {}).pop(key, None)

    async def swap(self, kind: str, key: str, old: Any, new: Any) -> bool:
        """Replace ``old`` by ``new`` only if ``old`` is still there (compare and set)."""
        table = self._data.setdefault(kind, {})
        if table.get(key) != _dump(old):
            return False
        table[key] = _dump(new)
        return True

    async def values(self, kind: str) -> list[Any]:
        return [json.loads(v) for v in self._data.get(kind, {}).values()]


_SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class RedisStore:
    """The fake gateway's objects in Redis, shared by every worker process as Stripe's
    are: an order retried by another worker (a re-claimed stream entry) finds the
    PaymentIntent the first one made. One hash per kind (``fakepay:intent``...)."""

    def __init__(self, redis: Any, prefix: str = "fakepay") -> None:
        self.redis = redis
        self.prefix = prefix

    async def get(self, kind: str, key: str) -> Any:
        raw = await self.redis.hget(f"{self.prefix}:{kind}", key)
        return None if raw is None else json.loads(raw)

    async def put(self, kind: str, key: str, value: Any) -> None:
        await self.redis.hset(f"{self.prefix}:{kind}", key, _dump(value))

    async def add(self, kind: str, key: str, value: Any) -> bool:
        return bool(await self.redis.hsetnx(f"{self.prefix}:{kind}", key, _dump(value)))

    async def delete(self, kind: str, key: str) -> None:
        await self.redis.hdel(f"{self.prefix}:{kind}", key)

    async def swap(self, kind: str, key: str, old: Any, new: Any) -> bool:
        return bool(await self.redis.eval(_SWAP, 1, f"{self.prefix}:{kind}", key,
                                          _dump(old), _dump(new)))

    async def values(self, kind: str) -> list[Any]:
        return [json.loads(v) for v in await self.redis.hvals(f"{self.prefix}:{kind}")]


class FakeGateway:
    """Deterministic gateway with Stripe's interface and rules (module docstring).

    Objects live in a :class:`MemoryStore` by default, or in Redis
    (:class:`RedisStore`, what the server uses) so every worker sees the same ones.
    Test cards: ``pm_card_chargeDeclined`` declines, ``pm_card_slow`` takes
    ``slow_seconds``; any other payment method succeeds."""

    name = "fake"

    def __init__(self, *, slow_seconds: float = 2.0, store: Any = None,
                 in_flight_lease_s: float | None = None) -> None:
        self.slow_seconds = slow_seconds
        # How long a request may hold its idempotency key unanswered before another
        # request with the key takes it over (its process died mid-request).
        self.in_flight_lease_s = (max(10.0, 3 * slow_seconds) if in_flight_lease_s is None
                                  else in_flight_lease_s)
        self.store = store if store is not None else MemoryStore()
        self.calls: dict[str, int] = {}
        self.listeners: list[Listener] = []  # get every event, as webhooks would
        self._deliveries: set[asyncio.Task] = set()

    # -- idempotency -------------------------------------------------------
    async def _idempotent(self, key: str, params: dict[str, Any],
                          run: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """``(replayed, result)``: run once per key; the same key with other
        parameters is ``idempotency_error``; a request while another with the same
        key is running waits for its answer.

        The gateway runs inside its caller's process, so a caller SIGKILLed
        mid-request leaves its key in flight with nobody to answer it (Stripe's own
        servers finish a request whatever happens to the client). A key in flight
        longer than :attr:`in_flight_lease_s` is taken over and the request run again:
        ``run`` is written to be repeated (the intent's id comes from the key)."""
        fingerprint = _dump(params)
        deadline = time.monotonic() + self.in_flight_lease_s + 1.0
        mine = [fingerprint, None, time.time()]
        while not await self.store.add("idem", key, mine):
            seen = await self.store.get("idem", key)
            if seen is None:
                continue  # the other request failed and let go of the key
            if seen[0] != fingerprint:
                raise GatewayError("idempotency key reused with different parameters",
                                   code="idempotency_error")
            if seen[1] is not None:
                return True, seen[1]
            started = seen[2] if len(seen) > 2 else None
            if started is not None and time.time() - started > self.in_flight_lease_s:
                mine = [fingerprint, None, time.time()]
                if await self.store.swap("idem", key, seen, mine):
                    log.warning("fake gateway: took over an idempotency key left in flight",
                                extra={"idempotency_key": key})
                    break
                continue
            if time.monotonic() > deadline:
                raise GatewayError("another request with this idempotency key is running",
                                   code="idempotency_key_in_use", retryable=True)
            await asyncio.sleep(0.02)
        try:
            result = await run()
        except BaseException:
            await self.store.delete("idem", key)  # not answered: a retry runs again
            raise
        await self.store.put("idem", key, [fingerprint, result])
        return False, result

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    # -- objects -----------------------------------------------------------
    def _intent(self, pi: dict[str, Any]) -> Intent:
        return Intent(
            id=pi["id"], status=IntentStatus(pi["status"]), amount=pi["amount"],
            currency=pi["currency"], capture_method=pi["capture_method"],
            amount_received=pi["amount_received"], client_secret=pi["client_secret"],
            latest_charge=pi["charge"], fee=pi["fee"], capture_before=pi["capture_before"],
            error_code=pi["error_code"], error_message=pi["error_message"],
            transfer_group=pi["transfer_group"], metadata=dict(pi["metadata"]),
        )

    async def _get(self, intent_id: str) -> dict[str, Any]:
        pi = await self.store.get("intent", intent_id)
        if pi is None:
            raise GatewayError(f"no such payment intent {intent_id}", code="resource_missing")
        return pi

    async def _change(self, intent_id: str,
                      change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Apply ``change`` to the intent's current state atomically (compare and set,
        retried on a concurrent change); ``change`` raises to refuse."""
        while True:
            old = await self._get(intent_id)
            new = change(json.loads(json.dumps(old)))
            if await self.store.swap("intent", intent_id, old, new):
                return new

    # -- events ------------------------------------------------------------
    def _emit(self, type_: str, obj: dict[str, Any]) -> None:
        event = {"id": "evt_fake_" + secrets.token_hex(12), "object": "event",
                 "type": type_, "created": int(time.time()), "livemode": False,
                 "data": {"object": obj}}
        for listener in list(self.listeners):
            task = asyncio.create_task(self._deliver(listener, event))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    @staticmethod
    async def _deliver(listener: Listener, event: dict[str, Any]) -> None:
        delay = 0.1
        for _ in range(200):  # Stripe retries for days; a dev process for ~15 minutes
            try:
                await listener(event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("fake gateway event not accepted yet", extra={
                    "event": event["type"], "error": f"{type(exc).__name__}: {exc}"[:200]})
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 5.0)
        log.error("fake gateway event dropped", extra={"event": event["type"]})

    def _emit_intent(self, pi: dict[str, Any]) -> None:
        status = IntentStatus(pi["status"])
        type_ = {IntentStatus.SUCCEEDED: "payment_intent.succeeded",
                 IntentStatus.CANCELED: "payment_intent.canceled",
                 IntentStatus.REQUIRES_CAPTURE: "payment_intent.amount_capturable_updated",
                 }.get(status)
        if type_ is None and pi.get("error_code"):
            type_ = "payment_intent.payment_failed"
        if type_ is not None:
            self._emit(type_, {"object": "payment_intent", **pi})

    # -- PaymentIntents ----------------------------------------------------
    def _confirmed(self, pm: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def change(pi: dict[str, Any]) -> dict[str, Any]:
            if pi["status"] not in _CONFIRMABLE:
                raise GatewayError(f"This PaymentIntent's status is {pi['status']}.",
                                   code="payment_intent_unexpected_state")
            if pm == "pm_card_chargeDeclined":
                pi.update(status=IntentStatus.REQUIRES_PAYMENT_METHOD.value,
                          error_code="card_declined",
                          error_message="Your card was declined.")
                return pi
            pi.update(charge="ch_fake_" + pi["id"][8:], error_code=None, error_message=None)
            if pi["capture_method"] == "manual":
                pi.update(status=IntentStatus.REQUIRES_CAPTURE.value,
                          capture_before=int(time.time()) + AUTHORIZATION_WINDOW_SECONDS)
            else:
                pi.update(status=IntentStatus.SUCCEEDED.value, amount_received=pi["amount"],
                          fee=fake_fee(pi["amount"]))
            return pi
        return change

    async def _confirm(self, intent_id: str, pm: str) -> dict[str, Any]:
        if pm == "pm_card_slow":
            await asyncio.sleep(self.slow_seconds)  # before it takes effect
        pi = await self._change(intent_id, self._confirmed(pm))
        self._emit_intent(pi)
        return pi

    async def create_intent(self, *, amount: int, currency: str, idempotency_key: str,
                            flow: Flow, capture_manual: bool = False,
                            payment_method: str | None = None, customer: str | None = None,
                            transfer_group: str | None = None,
                            metadata: dict[str, str] | None = None) -> Intent:
        params = {"amount": amount, "currency": currency, "flow": str(flow),
                  "capture_manual": capture_manual, "payment_method": payment_method,
                  "customer": customer, "transfer_group": transfer_group,
                  "metadata": metadata or {}}

        async def run() -> str:
            self._count("create_intent")
            # Deterministic id from the key: a second process asked again finds it.
            pid = "pi_fake_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
            pi: dict[str, Any] = {
                "id": pid, "status": IntentStatus.REQUIRES_PAYMENT_METHOD.value,
                "amount": amount, "currency": currency,
                "capture_method": "manual" if capture_manual else "automatic",
                "amount_received": 0, "client_secret": f"{pid}_secret_fake",
                "charge": None, "fee": 0, "capture_before": None, "error_code": None,
                "error_message": None, "transfer_group": transfer_group,
                "metadata": dict(metadata or {}), "refunded": 0,
            }
            confirm = flow is Flow.OFF_SESSION or (flow is Flow.MANUAL_CAPTURE
                                                   and payment_method)
            if not await self.store.add("intent", pid, pi):
                # an earlier run made it and stopped before answering
                pi = await self._get(pid)
                if not (pi["status"] in _CONFIRMABLE and not pi["error_code"]):
                    return pid
            if confirm:
                await self._confirm(pid, payment_method or "")
            return pid

        _, pid = await self._idempotent(idempotency_key, params, run)
        return self._intent(await self._get(pid))

    async def confirm_as_buyer(self, intent_id: str, payment_method: str) -> Intent:
        """What Stripe.js would do with the client secret (dev and tests)."""
        return self._intent(await self._confirm(intent_id, payment_method))

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return self._intent(await self._get(intent_id))

    async def capture_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        def change(pi: dict[str, Any]) -> dict[str, Any]:
            if pi["status"] != IntentStatus.REQUIRES_CAPTURE:
                raise GatewayError(f"This PaymentIntent could not be captured because it "
                                   f"has a status of {pi['status']}.",
                                   code="payment_intent_unexpected_state")
            pi.update(status=IntentStatus.SUCCEEDED.value, amount_received=pi["amount"],
                      fee=fake_fee(pi["amount"]))
            return pi

        async def run() -> str:
            self._count("capture_intent")
            self._emit_intent(await self._change(intent_id, change))
            return intent_id

        await self._idempotent(idempotency_key, {"capture": intent_id}, run)
        return self._intent(await self._get(intent_id))

    async def cancel_intent(self, intent_id: str, *, idempotency_key: str) -> Intent:
        def change(pi: dict[str, Any]) -> dict[str, Any]:
            if pi["status"] not in _CANCELLABLE:
                raise GatewayError(f"You cannot cancel this PaymentIntent because it has "
                                   f"a status of {pi['status']}.",
                                   code="payment_intent_unexpected_state")
            pi["status"] = IntentStatus.CANCELED.value
            return pi

        async def run() -> str:
            self._count("cancel_intent")
            self._emit_intent(await self._change(intent_id, change))
            return intent_id

        await self._idempotent(idempotency_key, {"cancel": intent_id}, run)
        return self._intent(await self._get(intent_id))

    async def refund(self, intent_id: str, *, idempotency_key: str,
                     amount: int | None = None) -> Refund:
        amounts: list[int] = []

        def change(pi: dict[str, Any]) -> dict[str, Any]:
            left = pi["amount_received"] - pi["refunded"]
            if pi["status"] != IntentStatus.SUCCEEDED:
                raise GatewayError("PaymentIntent has no charge to refund",
                                   code="charge_not_refundable")
            if left <= 0:
                raise GatewayError(f"Charge {pi['charge']} has already been refunded.",
                                   code="charge_already_refunded")
            amt = left if amount is None else amount
            if amt < 1 or amt > left:
                raise GatewayError(f"Refund amount ({amt}) is greater than unrefunded "
                                   f"amount on charge ({left})", code="amount_too_large")
            pi["refunded"] += amt
            amounts[:] = [amt]
            return pi

        async def run() -> str:
            pi = await self._change(intent_id, change)
            self._count("refund")
            ref = Refund(id="re_fake_" + secrets.token_hex(8), amount=amounts[0],
                         payment_intent=pi["id"])
            await self.store.put("refund", ref.id, dataclasses.asdict(ref))
            self._emit("charge.refunded", self._charge_object(pi))
            self._emit("refund.created", {
                "id": ref.id, "object": "refund", "amount": ref.amount,
                "charge": pi["charge"], "payment_intent": pi["id"],
                "currency": pi["currency"], "status": "succeeded"})
            return ref.id

        _, rid = await self._idempotent(idempotency_key,
                                        {"refund": intent_id, "amount": amount}, run)
        return Refund(**await self.store.get("refund", rid))

    @staticmethod
    def _charge_object(pi: dict[str, Any]) -> dict[str, Any]:
        return {"id": pi["charge"], "object": "charge", "payment_intent": pi["id"],
                "amount": pi["amount"], "amount_captured": pi["amount_received"],
                "amount_refunded": pi["refunded"],
                "refunded": pi["refunded"] >= pi["amount_received"] > 0,
                "currency": pi["currency"]}

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

        async def run() -> str:
            self._count("transfer")
            tr = Transfer(id="tr_fake_" + secrets.token_hex(8), amount=amount,
                          destination=destination, transfer_group=transfer_group)
            await self.store.put("transfer", tr.id, dataclasses.asdict(tr))
            return tr.id

        _, tid = await self._idempotent(idempotency_key, params, run)
        return Transfer(**await self.store.get("transfer", tid))

    async def close(self) -> None:
        await asyncio.gather(*(stop_task(task, log) for task in list(self._deliveries)))
