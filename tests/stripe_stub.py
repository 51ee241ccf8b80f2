"""A Stripe-compatible HTTP server on loopback for the tests.

The real ``stripe`` SDK talks to it through ``StripeClient(base_addresses={"api": ...})``,
so the tests exercise the SDK's request path (form encoding, headers, error mapping).
It covers what dropserver calls, following Stripe's API reference:

* PaymentIntents: create (``confirm``, ``off_session``, ``payment_method``,
  ``capture_method=manual``, ``transfer_group``, ``metadata``), retrieve (with
  ``expand[]=latest_charge.balance_transaction``), confirm, capture, cancel.
* Charges and Disputes: retrieve. Refunds: create. Transfers (Connect): create.
* ``Idempotency-Key``: the same key with the same parameters replays the first
  response (errors included); different parameters answer 400 ``idempotency_error``
  (https://docs.stripe.com/api/idempotent_requests).
* Signed webhook events: :meth:`StripeStub.deliver` POSTs an event with a
  ``Stripe-Signature: t=...,v1=...`` header (HMAC-SHA256 of ``"t.payload"``).
  Every state change also records the events Stripe would send (:attr:`events`:
  ``payment_intent.succeeded`` / ``.payment_failed`` / ``.canceled`` /
  ``.amount_capturable_updated`` / ``.requires_action``, and for a refund
  ``charge.refunded`` then ``refund.created``, as API versions since 2024-10-28 do:
  https://docs.stripe.com/changelog/acacia/2024-10-28/refund-webhook-update). With
  ``webhook_url`` set they are POSTed there, signed, from a thread; a delivery that
  fails or answers non-2xx is tried again later (Stripe retries for days), so
  deliveries arrive at least once and not in order.

Test cards (payment method ids), as in Stripe's testing docs:
``pm_card_visa`` succeeds, ``pm_card_chargeDeclined`` declines (402 ``card_declined``),
``pm_card_authenticationRequired`` needs the buyer (off-session: 402
``authentication_required``).

Every request is counted in :attr:`StripeStub.calls` as ``"POST /v1/payment_intents"``
(ids replaced by ``{id}``) so a test can assert "exactly one PaymentIntent".
Fees mimic 2.9% + 30 on each charge.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import hmac
import itertools
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["StripeStub", "sign_payload"]

CANCELABLE = {"requires_payment_method", "requires_capture", "requires_confirmation",
              "requires_action"}
AUTH_WINDOW = 7 * 24 * 3600  # uncaptured PaymentIntents lapse after 7 days


def sign_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``a[b][c]=v`` and ``expand[0]=x`` form keys into nested dicts and lists."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = parts[i + 1] if not last else None
            if isinstance(node, list):
                if last:
                    node.append(value)
                    break
                node.append({} if nxt and not nxt.isdigit() else [])
                node = node[-1]
                continue
            if last:
                node[part] = value
            else:
                default: Any = [] if (nxt == "[]" or (nxt or "").isdigit()) else {}
                node = node.setdefault(part, default)
    # lists written as expand[0]=..&expand[1]=.. became dicts keyed by digits
    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            if v and all(k.isdigit() for k in v):
                return [fix(v[k]) for k in sorted(v, key=int)]
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return fix(out)


def _truthy(v: Any) -> bool:
    return str(v).lower() == "true"


class StubError(Exception):
    def __init__(self, status: int, type_: str, message: str, code: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"type": type_, "message": message,
                               **({"code": code} if code else {}), **extra}}


class StripeStub:
    """Start with :meth:`start` (or use as a context manager); ``url`` is the base."""

    def __init__(self, webhook_secret: str = "whsec_test_secret",
                 webhook_url: str = "") -> None:
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url  # POST every event there (a thread, with retries)
        self.events: list[dict] = []    # every event Stripe would have sent, in order
        self.delivered: collections.Counter[str] = collections.Counter()  # by status
        self._outbox: list[tuple[float, int, int, dict]] = []  # (due, seq, tries, event)
        self._seq = itertools.count()
        self._outbox_cv = threading.Condition()
        self._stopping = False
        self._sender: threading.Thread | None = None
        self.intents: dict[str, dict] = {}
        self.charges: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.transfers: dict[str, dict] = {}
        self.disputes: dict[str, dict] = {}
        self.balance_transactions: dict[str, dict] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.idempotency_keys: list[str] = []
        self.accounts: list[str | None] = []
        self._idem: dict[str, tuple[str, int, dict]] = {}
        self._lock = threading.Lock()
        self.delay = 0.0  # seconds every API call waits (slow gateway)
        self.fail_next: list[int] = []  # statuses to answer the next calls with
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> StripeStub:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = Starlette(routes=[
            Route("/v1/{path:path}", self._dispatch, methods=["GET", "POST", "DELETE"]),
        ])
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stripe stub did not start")
            time.sleep(0.01)
        self._sock = sock
        self.url = f"http://127.0.0.1:{port}"
        self._sender = threading.Thread(target=self._send_events, daemon=True)
        self._sender.start()
        return self

    def stop(self) -> None:
        with self._outbox_cv:
            self._stopping = True
            self._outbox_cv.notify_all()
        if self._sender is not None:
            self._sender.join(10)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> StripeStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- webhooks sent by the stub itself -------------------------------------
    def _emit(self, type_: str, obj: dict) -> None:
        """Record the event Stripe sends for a change; queue it for ``webhook_url``."""
        event = self.make_event(type_, json.loads(json.dumps(obj)))
        self.events.append(event)
        if self.webhook_url:
            with self._outbox_cv:
                heapq.heappush(self._outbox, (time.monotonic(), next(self._seq), 0, event))
                self._outbox_cv.notify()

    def _send_events(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                with self._outbox_cv:
                    while not self._stopping and (
                            not self._outbox or self._outbox[0][0] > time.monotonic()):
                        wait = self._outbox[0][0] - time.monotonic() if self._outbox else None
                        self._outbox_cv.wait(wait)
                    if self._stopping:
                        return
                    _, _, tries, event = heapq.heappop(self._outbox)
                payload = json.dumps(event).encode()
                try:
                    status = client.post(self.webhook_url, content=payload, headers={
                        "Stripe-Signature": sign_payload(payload, self.webhook_secret),
                        "Content-Type": "application/json"}).status_code
                except httpx.HTTPError:
                    status = 0
                self.delivered[str(status)] += 1
                if not 200 <= status < 300:
                    due = time.monotonic() + min(5.0, 0.25 * 2 ** tries)
                    with self._outbox_cv:
                        heapq.heappush(self._outbox, (due, next(self._seq), tries + 1, event))

    def undelivered(self) -> int:
        """Events still waiting for a 2xx from ``webhook_url``."""
        with self._outbox_cv:
            return len(self._outbox)

    # -- test helpers ------------------------------------------------------
    def count(self, call: str) -> int:
        return self.calls[call]

    def make_event(self, type_: str, obj: dict) -> dict:
        return {"id": "evt_" + secrets.token_hex(12), "object": "event", "type": type_,
                "api_version": "2025-01-01", "created": int(time.time()),
                "livemode": False, "pending_webhooks": 1,
                "data": {"object": obj}}

    def event_for(self, type_: str, object_id: str) -> dict:
        """An event carrying a snapshot of the object as it is now."""
        for store in (self.intents, self.charges, self.disputes, self.refunds):
            if object_id in store:
                return self.make_event(type_, json.loads(json.dumps(store[object_id])))
        raise KeyError(object_id)

    async def deliver(self, url: str, event: dict, *, secret: str | None = None,
                      timestamp: int | None = None) -> httpx.Response:
        payload = json.dumps(event).encode()
        header = sign_payload(payload, secret or self.webhook_secret, timestamp)
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(url, content=payload, headers={
                "Stripe-Signature": header, "Content-Type": "application/json"})

    def confirm_as_buyer(self, intent_id: str, payment_method: str = "pm_card_visa") -> dict:
        """What Stripe.js does with the client secret: confirm with a card."""
        with self._lock:
            return self._confirm(self.intents[intent_id], payment_method, off_session=False)

    def open_dispute(self, intent_id: str, status: str = "needs_response") -> dict:
        with self._lock:
            pi = self.intents[intent_id]
            charge = self.charges[pi["latest_charge"]]
            dp = {"id": "dp_" + secrets.token_hex(8), "object": "dispute",
                  "amount": charge["amount"], "currency": charge["currency"],
                  "charge": charge["id"], "payment_intent": pi["id"], "status": status,
                  "reason": "fraudulent", "created": int(time.time())}
            self.disputes[dp["id"]] = dp
            charge["disputed"] = True
            return dp

    def close_dispute(self, dispute_id: str, status: str) -> dict:
        with self._lock:
            self.disputes[dispute_id]["status"] = status
            return self.disputes[dispute_id]

    # -- HTTP --------------------------------------------------------------
    async def _dispatch(self, request: Request) -> JSONResponse:
        path = "/v1/" + request.path_params["path"]
        body = (await request.body()).decode()
        pairs = urllib.parse.parse_qsl(body, keep_blank_values=True)
        pairs += urllib.parse.parse_qsl(request.url.query, keep_blank_values=True)
        params = _unflatten(pairs)
        pattern = re.sub(r"/(pi|ch|re|tr|dp|txn)_[A-Za-z0-9]+", "/{id}", path)
        key = request.headers.get("idempotency-key")
        with self._lock:
            self.calls[f"{request.method} {pattern}"] += 1
            self.accounts.append(request.headers.get("stripe-account"))
            if key:
                self.idempotency_keys.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            if self.fail_next:
                status = self.fail_next.pop(0)
                return JSONResponse({"error": {"type": "api_error",
                                               "message": "injected failure"}},
                                    status_code=status)
            fingerprint = json.dumps([request.method, path, params], sort_keys=True)
            if key and request.method == "POST":
                seen = self._idem.get(key)
                if seen is not None:
                    if seen[0] != fingerprint:
                        return JSONResponse({"error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used "
                                       "with the same parameters they were first used "
                                       "with."}}, status_code=400)
                    return JSONResponse(seen[2], status_code=seen[1],
                                        headers={"Idempotent-Replayed": "true"})
            try:
                status, result = 200, self._route(request.method, path, params)
            except StubError as exc:
                status, result = exc.status, exc.body
            if key and request.method == "POST" and status < 500:
                self._idem[key] = (fingerprint, status, json.loads(json.dumps(result)))
            return JSONResponse(result, status_code=status)

    def _route(self, method: str, path: str, p: dict) -> dict:
        parts = path.strip("/").split("/")[1:]
        res = parts[0]
        oid = parts[1] if len(parts) > 1 else None
        action = parts[2] if len(parts) > 2 else None
        if res == "payment_intents":
            if method == "POST" and oid is None:
                return self._create_intent(p)
            pi = self._get(self.intents, oid)
            if method == "GET" and action is None:
                return self._expand(pi, p.get("expand") or [])
            if method == "POST" and action == "confirm":
                return self._confirm(pi, p.get("payment_method") or pi["payment_method"],
                                     off_session=_truthy(p.get("off_session")))
            if method == "POST" and action == "capture":
                return self._capture(pi, p)
            if method == "POST" and action == "cancel":
                return self._cancel(pi, p)
        if res == "charges" and method == "GET" and oid:
            return self._get(self.charges, oid)
        if res == "disputes" and method == "GET" and oid:
            return self._get(self.disputes, oid)
        if res == "refunds" and method == "POST" and oid is None:
            return self._refund(p)
        if res == "transfers" and method == "POST" and oid is None:
            return self._transfer(p)
        if res == "transfers" and method == "GET" and oid:
            return self._get(self.transfers, oid)
        raise StubError(404, "invalid_request_error", f"Unrecognized request URL ({path})")

    @staticmethod
    def _get(store: dict, oid: str | None) -> dict:
        if oid not in store:
            raise StubError(404, "invalid_request_error", f"No such object: '{oid}'",
                            code="resource_missing")
        return store[oid]

    def _expand(self, pi: dict, expand: list[str]) -> dict:
        out = json.loads(json.dumps(pi))
        if ("latest_charge" in expand or "latest_charge.balance_transaction" in expand) \
                and pi.get("latest_charge"):
            charge = json.loads(json.dumps(self.charges[pi["latest_charge"]]))
            if "latest_charge.balance_transaction" in expand and charge.get(
                    "balance_transaction"):
                charge["balance_transaction"] = self.balance_transactions[
                    charge["balance_transaction"]]
            out["latest_charge"] = charge
        return out

    def _create_intent(self, p: dict) -> dict:
        try:
            amount = int(p["amount"])
            currency = p["currency"]
        except (KeyError, ValueError):
            raise StubError(400, "invalid_request_error", "Missing required param: amount.",
                            code="parameter_missing", param="amount") from None
        if amount < 1:
            raise StubError(400, "invalid_request_error", "amount must be positive",
                            code="parameter_invalid_integer", param="amount")
        pid = "pi_" + secrets.token_hex(12)
        pi = {
            "id": pid, "object": "payment_intent", "amount": amount,
            "amount_capturable": 0, "amount_received": 0, "currency": currency,
            "capture_method": p.get("capture_method", "automatic_async"),
            "client_secret": f"{pid}_secret_{secrets.token_hex(8)}",
            "created": int(time.time()), "customer": p.get("customer"),
            "last_payment_error": None, "latest_charge": None,
            "metadata": p.get("metadata") or {}, "payment_method": p.get("payment_method"),
            "status": "requires_payment_method" if not p.get("payment_method")
            else "requires_confirmation",
            "transfer_group": p.get("transfer_group"), "canceled_at": None,
            "cancellation_reason": None, "livemode": False,
        }
        self.intents[pid] = pi
        if _truthy(p.get("confirm")):
            if not pi["payment_method"]:
                raise StubError(400, "invalid_request_error",
                                "confirm requires a payment_method",
                                code="payment_intent_unexpected_state")
            return self._confirm(pi, pi["payment_method"],
                                 off_session=_truthy(p.get("off_session")))
        return pi

    def _confirm(self, pi: dict, pm: str | None, *, off_session: bool) -> dict:
        if pi["status"] not in ("requires_payment_method", "requires_confirmation",
                                "requires_action"):
            raise StubError(400, "invalid_request_error",
                            f"This PaymentIntent's status is {pi['status']}.",
                            code="payment_intent_unexpected_state")
        pi["payment_method"] = pm
        if pm == "pm_card_chargeDeclined":
            pi["status"] = "requires_payment_method"
            pi["last_payment_error"] = {"type": "card_error", "code": "card_declined",
                                        "decline_code": "generic_decline",
                                        "message": "Your card was declined."}
            self._new_charge(pi, "failed")
            self._emit("payment_intent.payment_failed", pi)
            raise StubError(402, "card_error", "Your card was declined.",
                            code="card_declined", decline_code="generic_decline",
                            payment_intent=json.loads(json.dumps(pi)))
        if pm == "pm_card_authenticationRequired":
            if off_session:
                pi["status"] = "requires_payment_method"
                pi["last_payment_error"] = {
                    "type": "card_error", "code": "authentication_required",
                    "message": "This payment requires authentication."}
                self._emit("payment_intent.payment_failed", pi)
                raise StubError(402, "card_error", "This payment requires authentication.",
                                code="authentication_required",
                                payment_intent=json.loads(json.dumps(pi)))
            pi["status"] = "requires_action"
            self._emit("payment_intent.requires_action", pi)
            return pi
        if not pm or not pm.startswith("pm_"):
            raise StubError(400, "invalid_request_error", f"No such PaymentMethod: '{pm}'",
                            code="resource_missing", param="payment_method")
        pi["last_payment_error"] = None
        if pi["capture_method"] == "manual":
            pi["status"] = "requires_capture"
            pi["amount_capturable"] = pi["amount"]
            self._new_charge(pi, "succeeded", captured=False)
            self._emit("payment_intent.amount_capturable_updated", pi)
        else:
            pi["status"] = "succeeded"
            pi["amount_received"] = pi["amount"]
            self._new_charge(pi, "succeeded", captured=True)
            self._emit("payment_intent.succeeded", pi)
        return pi

    def _new_charge(self, pi: dict, status: str, captured: bool = False) -> dict:
        cid = "ch_" + secrets.token_hex(12)
        now = int(time.time())
        charge = {
            "id": cid, "object": "charge", "amount": pi["amount"], "currency": pi["currency"],
            "amount_captured": pi["amount"] if captured else 0, "amount_refunded": 0,
            "captured": captured, "refunded": False, "disputed": False, "status": status,
            "payment_intent": pi["id"], "balance_transaction": None,
            "transfer_group": pi["transfer_group"],
            "payment_method_details": {"type": "card", "card": {
                "brand": "visa", "last4": "4242",
                "capture_before": now + AUTH_WINDOW if status == "succeeded" else None}},
        }
        self.charges[cid] = charge
        pi["latest_charge"] = cid
        if captured:
            self._settle_charge(charge)
        return charge

    def _settle_charge(self, charge: dict) -> None:
        amount = charge["amount_captured"]
        fee = (amount * 29 + 500) // 1000 + 30
        txn = {"id": "txn_" + secrets.token_hex(12), "object": "balance_transaction",
               "amount": amount, "fee": fee, "net": amount - fee,
               "currency": charge["currency"]}
        self.balance_transactions[txn["id"]] = txn
        charge["balance_transaction"] = txn["id"]

    def _capture(self, pi: dict, p: dict) -> dict:
        if pi["status"] != "requires_capture":
            raise StubError(400, "invalid_request_error",
                            f"This PaymentIntent could not be captured because it has a "
                            f"status of {pi['status']}.",
                            code="payment_intent_unexpected_state")
        amount = int(p.get("amount_to_capture") or pi["amount"])
        if amount > pi["amount"]:
            raise StubError(400, "invalid_request_error",
                            "amount_to_capture must be <= amount",
                            code="amount_too_large", param="amount_to_capture")
        pi["status"] = "succeeded"
        pi["amount_received"] = amount
        pi["amount_capturable"] = 0
        charge = self.charges[pi["latest_charge"]]
        charge["captured"] = True
        charge["amount_captured"] = amount
        self._settle_charge(charge)
        self._emit("payment_intent.succeeded", pi)
        return pi

    def _cancel(self, pi: dict, p: dict) -> dict:
        if pi["status"] not in CANCELABLE:
            raise StubError(400, "invalid_request_error",
                            f"You cannot cancel this PaymentIntent because it has a status "
                            f"of {pi['status']}.", code="payment_intent_unexpected_state")
        pi["status"] = "canceled"
        pi["canceled_at"] = int(time.time())
        pi["cancellation_reason"] = p.get("cancellation_reason")
        pi["amount_capturable"] = 0
        self._emit("payment_intent.canceled", pi)
        return pi

    def _refund(self, p: dict) -> dict:
        pi = self._get(self.intents, p.get("payment_intent"))
        if pi["status"] != "succeeded":
            raise StubError(400, "invalid_request_error", "PaymentIntent has no charge "
                            "to refund", code="charge_not_refundable")
        charge = self.charges[pi["latest_charge"]]
        left = charge["amount_captured"] - charge["amount_refunded"]
        if left <= 0:
            raise StubError(400, "invalid_request_error",
                            f"Charge {charge['id']} has already been refunded.",
                            code="charge_already_refunded")
        amount = int(p.get("amount") or left)
        if amount < 1 or amount > left:
            raise StubError(400, "invalid_request_error",
                            f"Refund amount ({amount}) is greater than unrefunded amount "
                            f"on charge ({left})", code="amount_too_large")
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
        rid = "re_" + secrets.token_hex(12)
        refund = {"id": rid, "object": "refund", "amount": amount, "charge": charge["id"],
                  "payment_intent": pi["id"], "currency": pi["currency"],
                  "status": "succeeded", "metadata": p.get("metadata") or {}}
        self.refunds[rid] = refund
        self._emit("charge.refunded", charge)
        self._emit("refund.created", refund)
        return refund

    def _transfer(self, p: dict) -> dict:
        for name in ("amount", "currency", "destination"):
            if not p.get(name):
                raise StubError(400, "invalid_request_error",
                                f"Missing required param: {name}.",
                                code="parameter_missing", param=name)
        if not p["destination"].startswith("acct_"):
            raise StubError(400, "invalid_request_error",
                            f"No such destination: '{p['destination']}'",
                            code="resource_missing", param="destination")
        tid = "tr_" + secrets.token_hex(12)
        tr = {"id": tid, "object": "transfer", "amount": int(p["amount"]),
              "currency": p["currency"], "destination": p["destination"],
              "transfer_group": p.get("transfer_group"),
              "source_transaction": p.get("source_transaction"),
              "metadata": p.get("metadata") or {}, "reversed": False}
        self.transfers[tid] = tr
        return tr
