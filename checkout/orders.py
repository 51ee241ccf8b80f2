"""Order workers: the consumer group that turns holds into payments.

The reservation script appends ``type=reserve`` and ``type=release`` entries to each
drop's stream ``{drop:<id>}:orders`` (format: docs/topics/checkout.md). Every process
runs :class:`OrderWorker` consumers in the consumer group ``orders`` of every active
drop's stream (the drops in the set ``checkout:drops`` that prewarm/open_sales fill).

For a reserve entry, in this order, each step idempotent so a re-run after a crash at
any point repeats nothing that was done:

1. INSERT the ``orders`` row (state ``held``) -- PostgreSQL is the source of truth;
2. create the PaymentIntent with the idempotency key ``pi:<hold id>`` (a re-run gets
   the same intent back from the gateway, never a second charge);
3. INSERT the ``payments`` row and move the order to the intent's state;
4. tell the buyer (``order.payment`` with the client secret, ``order.paid``,
   ``order.failed``) through :func:`realtime.publish.publish_user`;
5. XACK.

A consumer that dies leaves its entries pending; every consumer periodically
XAUTOCLAIMs entries idle longer than ``DROPSERVER_ORDER_CLAIM_IDLE_MS``. Transient
failures (gateway 5xx, network, database) are retried with exponential backoff; an
entry that still fails, is malformed, or was delivered too often goes to the
dead-letter stream ``orders:dead`` (metric ``dropserver_order_dead_letters_total``) and
its order is failed and its hold released.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from checkout import keys
from checkout.payments import Flow, Gateway, GatewayError, Intent, IntentStatus
from dropserver.observability import bind

__all__ = [
    "DEAD_LETTER_STREAM",
    "GROUP",
    "BadEntry",
    "OrderProcessor",
    "OrderState",
    "OrderWorker",
    "ReleaseEntry",
    "ReserveEntry",
    "backoff",
    "can_transition",
    "parse_entry",
    "state_for_intent",
]

log = logging.getLogger("dropserver.orders")

GROUP = "orders"
DEAD_LETTER_STREAM = "orders:dead"
DEAD_LETTER_MAXLEN = 100_000

ORDERS_PROCESSED = Counter("dropserver_orders_processed_total",
                           "Order stream entries processed", ["type", "result"])
ORDER_SECONDS = Histogram("dropserver_order_processing_seconds",
                          "Time from reading an order entry to its XACK")
DEAD_LETTERS = Counter("dropserver_order_dead_letters_total",
                       "Order stream entries moved to the dead-letter stream", ["reason"])
ORDER_RETRIES = Counter("dropserver_order_retries_total",
                        "Order entries retried after a transient failure")

Notify = Callable[[Any, str, str, dict], Awaitable[None]]


# ---------------------------------------------------------------------------
# pure core: entries, states, backoff
# ---------------------------------------------------------------------------
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
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
    S.REFUNDED: frozenset(),
}
OPEN_STATES = frozenset({S.HELD, S.PAYMENT_PENDING, S.AUTHORIZED})


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


def backoff(attempt: int, *, base: float = 0.2, cap: float = 5.0) -> float:
    """Seconds before retry ``attempt`` (0-based): exponential with full jitter."""
    return random.uniform(0, min(cap, base * (2 ** attempt)))


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


@dataclass(frozen=True, slots=True)
class ReleaseEntry:
    hold_id: str
    drop_id: int
    reason: str


def _text(fields: Mapping[Any, Any]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = (
            v.decode() if isinstance(v, bytes) else str(v))
    return out


def parse_entry(fields: Mapping[Any, Any]) -> ReserveEntry | ReleaseEntry:
    """One stream entry's fields (bytes or str) as a typed entry, or :class:`BadEntry`."""
    f = _text(fields)

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
        unit_price=integer("unit_price", 1), amount=integer("amount", 1),
        currency=text("currency").lower(), idempotency_key=text("idempotency_key"),
        expires_at_ms=integer("expires_at", 0), flow=flow,
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


# ---------------------------------------------------------------------------
# adapters: notify the buyer, tell reservations about the hold
# ---------------------------------------------------------------------------
async def publish_user(redis: Any, user_id: str, event: str, data: dict) -> None:
    """Contract 1: a private event to all of the buyer's sockets."""
    from realtime.publish import publish_user as _publish_user

    await _publish_user(redis, user_id, event, data)


_RELEASED = {"expired": "expired", "cancelled": "cancelled", "failed": "failed"}


async def hold_paid(redis: Any, hold_id: str) -> OrderState | None:
    """Tell reservations the hold is paid (or authorized) so it stops expiring.

    Returns the state the hold was *released* to (expired, cancelled, failed) when it
    is too late -- its units went back to stock and the payment must be undone -- and
    None otherwise. A hold Redis does not know (lost with Redis, or never there) is
    left to PostgreSQL, the source of truth."""
    from checkout import holds

    try:
        await holds.mark_paid(redis, hold_id)
    except LookupError as exc:
        state = _RELEASED.get(str(exc).strip("'\""))
        if state is not None:
            return OrderState(state)
        log.warning("hold unknown to Redis while paying", extra={"hold_id": hold_id})
    except Exception:  # Redis down: the order is recorded; recovery rebuilds holds
        log.warning("could not mark hold paid", extra={"hold_id": hold_id}, exc_info=True)
    return None


async def hold_failed(redis: Any, hold_id: str) -> None:
    """The payment failed: give the units back (checkout.holds.release)."""
    from checkout import holds

    try:
        await holds.release(redis, hold_id, "failed")
    except Exception:  # the hold's expiry returns the units anyway
        log.warning("could not release hold", extra={"hold_id": hold_id}, exc_info=True)


def event_for(state: OrderState) -> str | None:
    return {
        S.PAYMENT_PENDING: "order.payment", S.AUTHORIZED: "order.payment",
        S.PAID: "order.paid", S.FAILED: "order.failed", S.EXPIRED: "order.expired",
        S.CANCELLED: "order.cancelled", S.REFUNDED: "order.refunded",
    }.get(state)


# ---------------------------------------------------------------------------
# the processor: one entry, idempotent
# ---------------------------------------------------------------------------
_ORDER_COLUMNS = ("id, public_id, drop_id, product_id, user_id, quantity, buyer_number, "
                  "unit_price, amount, currency, state, payment_flow, hold_expires_at")


class OrderProcessor:
    """Applies order stream entries to PostgreSQL and the gateway."""

    def __init__(self, db: asyncpg.Pool, redis: Redis, gateway: Gateway, *,
                 notify: Notify = publish_user,
                 on_authorized: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.db = db
        self.redis = redis
        self.gateway = gateway
        self.notify = notify
        # campaigns: called with the drop id after a backer's card is authorized
        self.on_authorized = on_authorized
        # test hook: awaited after the PaymentIntent exists, before PostgreSQL knows
        self.after_intent: Callable[[Intent], Awaitable[None]] | None = None

    async def handle(self, entry: ReserveEntry | ReleaseEntry) -> None:
        bind(drop_id=entry.drop_id)
        if isinstance(entry, ReserveEntry):
            await self.reserve(entry)
        else:
            await self.release(entry)

    # -- reserve -----------------------------------------------------------
    async def reserve(self, e: ReserveEntry) -> None:
        order = await self._upsert_order(e)
        state = OrderState(order["state"])
        payment = await self.db.fetchrow(
            "SELECT intent_id, status FROM payments WHERE order_id = $1", order["id"])
        if payment is None and state is not S.HELD:
            # expired or cancelled before an intent existed: nothing to charge
            return
        if payment is None:
            if e.expires_at_ms and e.expires_at_ms < time.time() * 1000:
                # the hold lapsed before we got to it: charge nothing (the sweeper
                # releases the units)
                await self.move(order, S.EXPIRED)
                return
            intent = await self._create_intent(order, e)
            if self.after_intent is not None:
                await self.after_intent(intent)
            await self.db.execute(
                """INSERT INTO payments (order_id, gateway, intent_id, idempotency_key,
                       status, amount, amount_received, fee, currency, capture_method,
                       capture_before, transfer_group, last_error)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                           to_timestamp($11::bigint), $12, $13)
                   ON CONFLICT (order_id) DO NOTHING""",
                order["id"], self.gateway.name, intent.id, intent_key(e.hold_id),
                intent.status.value, intent.amount, intent.amount_received, intent.fee,
                intent.currency, intent.capture_method, intent.capture_before,
                intent.transfer_group, intent.error_code)
        else:
            intent = await self.gateway.retrieve_intent(payment["intent_id"])
        await self.apply_intent(order, intent)

    async def _upsert_order(self, e: ReserveEntry) -> asyncpg.Record:
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING",
                               e.user_id)
            row = await conn.fetchrow(
                f"""INSERT INTO orders (public_id, drop_id, product_id, user_id, quantity,
                        buyer_number, unit_price, amount, currency, idempotency_key, state,
                        hold_expires_at, payment_flow)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'held',
                            to_timestamp($11::double precision / 1000), $12)
                    ON CONFLICT (public_id) DO NOTHING
                    RETURNING {_ORDER_COLUMNS}""",
                e.hold_id, e.drop_id, e.product_id, e.user_id, e.quantity, e.buyer_number,
                e.unit_price, e.amount, e.currency, e.idempotency_key, e.expires_at_ms,
                e.flow.value)
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {_ORDER_COLUMNS} FROM orders WHERE public_id = $1", e.hold_id)
            return row

    async def _create_intent(self, order: asyncpg.Record, e: ReserveEntry) -> Intent:
        drop = await self.db.fetchrow(
            "SELECT kind, campaign_deadline, now() AS now FROM drops WHERE id = $1",
            e.drop_id)
        campaign = drop is not None and drop["kind"] == "campaign"
        if campaign and drop["campaign_deadline"] is not None:
            from checkout.campaigns import check_deadline

            try:
                check_deadline(drop["campaign_deadline"], drop["now"])
            except ValueError as exc:  # the authorization could not be captured
                raise BadEntry(str(exc)) from None
        user = await self.db.fetchrow(
            "SELECT stripe_customer_id, default_payment_method FROM users WHERE id = $1",
            e.user_id)
        payment_method = customer = None
        if user is not None:
            customer = user["stripe_customer_id"]
            payment_method = user["default_payment_method"]
        if e.flow is Flow.OFF_SESSION and not payment_method:
            raise BadEntry("off_session order but the buyer has no saved payment method")
        if e.flow is Flow.CLIENT_CONFIRM:
            payment_method = None  # the buyer picks the card in Stripe.js
        return await self.gateway.create_intent(
            amount=e.amount, currency=e.currency, idempotency_key=intent_key(e.hold_id),
            flow=e.flow, capture_manual=campaign or e.flow is Flow.MANUAL_CAPTURE,
            payment_method=payment_method, customer=customer,
            transfer_group=transfer_group(e.drop_id),
            metadata={"order_id": e.hold_id, "drop_id": str(e.drop_id),
                      "product_id": str(e.product_id), "buyer_number": str(e.buyer_number)},
        )

    # -- state changes -----------------------------------------------------
    async def move(self, order: Mapping[str, Any], target: OrderState,
                   data: dict | None = None) -> bool:
        """Move the order to ``target`` if its state allows it; tell the buyer."""
        row = await self.db.fetchrow(
            """UPDATE orders SET state = $2, updated_at = now()
               WHERE id = $1 AND state = ANY($3::text[]) RETURNING state""",
            order["id"], target.value, sources_of(target))
        if row is None:
            return False
        await self._tell(order, target, data or {})
        return True

    async def _tell(self, order: Mapping[str, Any], state: OrderState, data: dict) -> None:
        event = event_for(state)
        if event is None:
            return
        body = {"order_id": order["public_id"], "drop_id": order["drop_id"],
                "product_id": order["product_id"], **data}
        try:
            await self.notify(self.redis, order["user_id"], event, body)
        except Exception:  # the order is recorded; the buyer can re-read it
            log.warning("could not notify buyer", extra={"order_id": order["public_id"]},
                        exc_info=True)

    async def apply_intent(self, order: Mapping[str, Any], intent: Intent) -> OrderState:
        """Record the intent's current state on ``payments`` and the order."""
        await self.db.execute(
            """UPDATE payments SET status = $2, amount_received = $3,
                   fee = GREATEST(fee, $4), last_error = $5,
                   capture_before = COALESCE(to_timestamp($6::bigint), capture_before),
                   updated_at = now()
               WHERE intent_id = $1""",
            intent.id, intent.status.value, intent.amount_received, intent.fee,
            intent.error_code, intent.capture_before)
        flow = Flow(order["payment_flow"])
        target = state_for_intent(intent, flow)
        current = OrderState(await self.db.fetchval(
            "SELECT state FROM orders WHERE id = $1", order["id"]))
        if current in (S.EXPIRED, S.CANCELLED, S.FAILED) and target in (S.PAID, S.AUTHORIZED,
                                                                       S.PAYMENT_PENDING):
            # The hold was released while the payment went on: never keep the money for
            # units that may be sold again.
            await self._undo(order, intent)
            return current
        if target is current:
            if target in (S.PAYMENT_PENDING, S.AUTHORIZED):
                await self._tell(order, target, self._payment_data(intent))  # re-send
            return current
        data = self._payment_data(intent) if target in (S.PAYMENT_PENDING,
                                                       S.AUTHORIZED) else {}
        if target is S.PAID:
            data = {"amount": intent.amount_received, "currency": intent.currency}
        if target is S.FAILED:
            data = {"reason": intent.error_code or "declined",
                    "message": intent.error_message or "the payment failed"}
        if target in (S.PAID, S.AUTHORIZED):
            released = await hold_paid(self.redis, order["public_id"])
            if released is not None:
                # the hold lapsed while the buyer paid: its units may be sold again
                await self.move(order, released)
                await self._undo(order, intent)
                return released
        moved = await self.move(order, target, data)
        if moved and target is S.FAILED:
            await hold_failed(self.redis, order["public_id"])
        if moved and target is S.AUTHORIZED:
            await self.db.execute(
                """INSERT INTO campaign_backers (drop_id, order_id, user_id)
                   VALUES ($1, $2, $3) ON CONFLICT DO NOTHING""",
                order["drop_id"], order["id"], order["user_id"])
            if self.on_authorized is not None:
                await self.on_authorized(order["drop_id"])
        return target if moved else current

    @staticmethod
    def _payment_data(intent: Intent) -> dict:
        data: dict[str, Any] = {"status": intent.status.value, "intent_id": intent.id,
                                "amount": intent.amount, "currency": intent.currency}
        if intent.status in (IntentStatus.REQUIRES_PAYMENT_METHOD,
                             IntentStatus.REQUIRES_CONFIRMATION,
                             IntentStatus.REQUIRES_ACTION):
            data["client_secret"] = intent.client_secret
        if intent.status is IntentStatus.REQUIRES_CAPTURE:
            data["status"] = "authorized"
        return data

    async def _undo(self, order: Mapping[str, Any], intent: Intent) -> None:
        hold_id = order["public_id"]
        try:
            if intent.status is IntentStatus.SUCCEEDED:
                await self.gateway.refund(intent.id, idempotency_key=f"refund:{hold_id}")
                log.warning("refunded a payment for a released hold",
                            extra={"order_id": hold_id})
            elif intent.status is not IntentStatus.CANCELED:
                intent = await self.gateway.cancel_intent(
                    intent.id, idempotency_key=f"cancel:{hold_id}")
        except GatewayError as exc:
            if exc.code != "payment_intent_unexpected_state":
                raise
            intent = await self.gateway.retrieve_intent(intent.id)
        await self.db.execute("UPDATE payments SET status = $2, updated_at = now() "
                              "WHERE intent_id = $1", intent.id, intent.status.value)

    # -- release -----------------------------------------------------------
    async def release(self, e: ReleaseEntry) -> None:
        order = await self.db.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE public_id = $1", e.hold_id)
        if order is None:
            # The reserve entry is still pending elsewhere: retry until it has landed.
            raise _NotYet(f"order {e.hold_id} not recorded yet")
        target = {"expired": S.EXPIRED, "cancelled": S.CANCELLED}.get(e.reason, S.FAILED)
        if OrderState(order["state"]) not in OPEN_STATES:
            return  # paid, or already released
        if not await self.move(order, target):
            return
        payment = await self.db.fetchrow(
            "SELECT intent_id FROM payments WHERE order_id = $1", order["id"])
        if payment is not None:
            intent = await self.gateway.retrieve_intent(payment["intent_id"])
            await self._undo(order, intent)


class _NotYet(Exception):
    """Retry later: something this entry depends on has not happened yet."""


# ---------------------------------------------------------------------------
# the consumer loop
# ---------------------------------------------------------------------------
_TRANSIENT = (RedisError, OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
              asyncpg.InterfaceError, asyncpg.DeadlockDetectedError,
              asyncpg.SerializationError, _NotYet)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, GatewayError):
        return exc.retryable
    return isinstance(exc, _TRANSIENT)


class OrderWorker:
    """One consumer of the ``orders`` group on every active drop's stream."""

    def __init__(self, redis: Redis, processor: OrderProcessor, *, consumer: str,
                 claim_idle_ms: int = 15000, max_attempts: int = 5,
                 max_deliveries: int = 10, batch: int = 32, block_ms: int = 1000,
                 concurrency: int = 32) -> None:
        self.redis = redis
        self.processor = processor
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_attempts = max_attempts
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.block_ms = block_ms
        self._sem = asyncio.Semaphore(concurrency)
        self._streams: set[str] = set()
        self._last_refresh = 0.0
        self._last_claim = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"order-worker:{self.consumer}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("order worker loop failed; retrying")
                await asyncio.sleep(1.0)

    # -- one round ---------------------------------------------------------
    async def refresh_streams(self, force: bool = False) -> set[str]:
        now = time.monotonic()
        if not force and now - self._last_refresh < 1.0:
            return self._streams
        self._last_refresh = now
        drop_ids = await self.redis.smembers(keys.ACTIVE_DROPS)
        for raw in drop_ids:
            stream = keys.orders(int(raw))
            if stream not in self._streams:
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._streams.add(stream)
        return self._streams

    async def run_once(self) -> int:
        """Claim stale entries, then read new ones; returns how many were handled."""
        streams = await self.refresh_streams()
        if not streams:
            await asyncio.sleep(min(self.block_ms / 1000, 0.5))
            return 0
        handled = 0
        if time.monotonic() - self._last_claim >= self.claim_idle_ms / 2000:
            self._last_claim = time.monotonic()
            handled += await self.claim_stale()
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(sorted(streams), ">"),
                count=self.batch, block=self.block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # a stream was deleted (Redis restarted, recovery rebuilt the drop): forget
            # what we know and create the groups again on the next round
            self._streams.clear()
            self._last_refresh = 0.0
            return handled
        for stream, entries in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            await self._handle_batch(name, entries, delivered=1)
            handled += len(entries)
        return handled

    async def claim_stale(self) -> int:
        """XAUTOCLAIM entries another consumer read and never acknowledged."""
        handled = 0
        for stream in sorted(set(self._streams)):
            start = "0-0"
            while True:
                try:
                    reply = await self.redis.xautoclaim(
                        stream, GROUP, self.consumer, min_idle_time=self.claim_idle_ms,
                        start_id=start, count=self.batch)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._streams.discard(stream)
                    break
                start, entries = reply[0], [x for x in reply[1] if x and x[1] is not None]
                if entries:
                    log.info("claimed stale order entries",
                             extra={"stream": stream, "count": len(entries)})
                    await self._handle_batch(stream, entries, delivered=None)
                    handled += len(entries)
                if start in (b"0-0", "0-0"):
                    break
        return handled

    async def _handle_batch(self, stream: str, entries: list, delivered: int | None) -> None:
        # Entries of one hold run in stream order; different holds run concurrently.
        by_hold: dict[str, list] = {}
        for entry_id, fields in entries:
            hold = _text(fields).get("hold_id", "")
            by_hold.setdefault(hold, []).append((entry_id, fields))

        async def run_group(group: list) -> None:
            for entry_id, fields in group:
                async with self._sem:
                    await self._handle_one(stream, entry_id, fields, delivered)

        await asyncio.gather(*(run_group(g) for g in by_hold.values()))

    async def _deliveries(self, stream: str, entry_id: Any) -> int:
        rows = await self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id,
                                               count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _handle_one(self, stream: str, entry_id: Any, fields: Mapping,
                          delivered: int | None) -> None:
        t0 = time.perf_counter()
        kind = _text(fields).get("type", "?")
        if delivered is None:
            delivered = await self._deliveries(stream, entry_id)
        if delivered > self.max_deliveries:
            await self.dead_letter(stream, entry_id, fields, "too_many_deliveries",
                                   f"delivered {delivered} times")
            return
        try:
            entry = parse_entry(fields)
        except BadEntry as exc:
            await self.dead_letter(stream, entry_id, fields, "malformed", str(exc))
            return
        for attempt in range(self.max_attempts):
            try:
                await self.processor.handle(entry)
            except asyncio.CancelledError:
                raise
            except BadEntry as exc:
                await self.dead_letter(stream, entry_id, fields, "rejected", str(exc))
                return
            except Exception as exc:
                if _retryable(exc) and attempt + 1 < self.max_attempts:
                    ORDER_RETRIES.inc()
                    log.warning("order entry failed, retrying",
                                extra={"stream": stream, "attempt": attempt + 1,
                                       "error": f"{type(exc).__name__}: {exc}"})
                    await asyncio.sleep(backoff(attempt))
                    continue
                reason = "retries_exhausted" if _retryable(exc) else "permanent_error"
                await self.dead_letter(stream, entry_id, fields, reason,
                                       f"{type(exc).__name__}: {exc}")
                return
            await self.redis.xack(stream, GROUP, entry_id)
            ORDERS_PROCESSED.labels(kind, "ok").inc()
            ORDER_SECONDS.observe(time.perf_counter() - t0)
            return

    async def dead_letter(self, stream: str, entry_id: Any, fields: Mapping, reason: str,
                          error: str) -> None:
        """Park the entry in ``orders:dead``, fail its order, release its hold, XACK."""
        f = _text(fields)
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        log.error("order entry dead-lettered",
                  extra={"stream": stream, "entry_id": eid, "reason": reason,
                         "error": error[:500], "hold_id": f.get("hold_id")})
        await self.redis.xadd(DEAD_LETTER_STREAM, {
            "stream": stream, "entry_id": eid, "reason": reason, "error": error[:2000],
            "fields": json.dumps(f), "at": str(int(time.time() * 1000))},
            maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        DEAD_LETTERS.labels(reason).inc()
        ORDERS_PROCESSED.labels(f.get("type", "?"), "dead").inc()
        if f.get("type") == "reserve" and f.get("hold_id"):
            with contextlib.suppress(Exception):
                order = await self.processor.db.fetchrow(
                    f"SELECT {_ORDER_COLUMNS} FROM orders WHERE public_id = $1",
                    f["hold_id"])
                if order is not None:
                    await self.processor.move(order, S.FAILED,
                                              {"reason": "processing_error",
                                               "message": "the order could not be processed"})
                elif f.get("user_id"):
                    await self.processor.notify(self.redis, f["user_id"], "order.failed", {
                        "order_id": f["hold_id"], "reason": "processing_error",
                        "message": "the order could not be processed"})
                await hold_failed(self.redis, f["hold_id"])
        await self.redis.xack(stream, GROUP, entry_id)
