"""Tips during the live: a viewer's tip from the creator's list of amounts, paid with a
real PaymentIntent, announced to the room once paid, refundable, settled.

:class:`Tips` keeps the order pipeline's guarantees (docs/topics/payments.md, "Tips"):

* **PostgreSQL first.** The ``tips`` row is inserted before the gateway is asked;
  ``(user, drop, idempotency key)`` makes a retried request the same tip, and the
  PaymentIntent's idempotency key ``pi:tip:<tip id>`` makes a retried create the same
  intent, never a second charge. ``tips.payment_requested`` is set before the gateway
  is asked: a crash between the charge and its row is repaired by asking again with
  the same key (:meth:`Tips.sweep`).
* **The intent decides.** The tip is ``paid`` when its intent ``succeeded``, however
  that is learnt (the buyer's confirm, Stripe's webhook, the sweep re-reading intents
  a lost webhook left pending); ``cancelled`` when it was cancelled; a decline leaves
  it ``payment_pending`` with ``last_error`` (another card may be tried, as Stripe.js
  allows). Moving to ``paid`` and enqueuing the ``tip.paid`` webhook are one
  transaction.
* **The room hears it once it is paid**: the durable drop event ``tip``, published
  then marked (``tips.announced``); the sweep publishes a paid tip not yet announced
  (at least once, within ``ANNOUNCE_WITHIN_S`` of the payment: later, the moment has
  passed).
* **Refunds are recorded** (``amount_refunded``, ``refunded`` when full) whichever
  path saw them (the creator's refund, Stripe's ``charge.refunded``), and the ledger
  is reversed if the drop was settled (``on_refunded``).
* **Abandoned tips are cancelled**: an intent still unpaid ``ABANDON_AFTER_S`` after
  it was made is cancelled (key ``cancel:tip:<tip id>``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from checkout.order_entries import transfer_group
from checkout.payment_types import Flow, Gateway, GatewayError, Intent, IntentStatus
from checkout.refunds import refund_in_full
from dropserver.outbound import EventType, enqueue
from realtime.publish import publish

__all__ = ["ABANDON_AFTER_S", "ANNOUNCE_WITHIN_S", "TIP_COLUMNS", "TipError", "Tips",
           "tip_json"]

log = logging.getLogger("dropserver.tips")

ABANDON_AFTER_S = 3600     # an unpaid tip's intent is cancelled after an hour
ANNOUNCE_WITHIN_S = 600    # a paid tip the room missed is announced up to 10 min late
SWEEP_AFTER_S = 30         # the sweep looks at pending tips untouched this long
MAX_MESSAGE = 200

TIP_COLUMNS = ("t.id, t.public_id, t.drop_id, t.user_id, t.display_name, t.amount, "
               "t.currency, t.message, t.state, t.intent_id, t.status, t.amount_received, "
               "t.amount_refunded, t.fee, t.last_error, t.payment_requested, t.announced, "
               "t.created_at, t.paid_at")

_CANCELLABLE = (IntentStatus.REQUIRES_PAYMENT_METHOD, IntentStatus.REQUIRES_CONFIRMATION,
                IntentStatus.REQUIRES_ACTION, IntentStatus.REQUIRES_CAPTURE)


class TipError(Exception):
    """A tip refused; ``code`` says why (docs/http-api.md, "Tips")."""

    def __init__(self, message: str, code: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def tip_json(row: asyncpg.Record, *, private: bool = False) -> dict[str, Any]:
    """A tip as the API answers it (``private``: to the tipper or the creator)."""
    out = {"tip_id": row["public_id"], "drop_id": row["drop_id"],
           "display_name": row["display_name"], "amount": row["amount"],
           "currency": row["currency"].strip(), "message": row["message"],
           "state": row["state"], "created_at": _iso(row["created_at"]),
           "paid_at": _iso(row["paid_at"])}
    if private:
        out.update({"user_id": row["user_id"], "amount_refunded": row["amount_refunded"],
                    "error": row["last_error"]})
    return out


def _room_event(row: asyncpg.Record) -> dict[str, Any]:
    return {"tip_id": row["public_id"], "user_id": row["user_id"],
            "name": row["display_name"], "amount": row["amount"],
            "currency": row["currency"].strip(), "message": row["message"]}


class Tips:
    """Tips over PostgreSQL, the gateway and the room (see the module docstring)."""

    def __init__(self, db: asyncpg.Pool, redis: Any, gateway: Gateway, *,
                 on_refunded: Callable[[int], Awaitable[Any]] | None = None) -> None:
        self.db = db
        self.redis = redis
        self.gateway = gateway
        self.on_refunded = on_refunded  # settlement: the ledger reversed if settled

    async def by_public_id(self, tip_id: str) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            f"SELECT {TIP_COLUMNS} FROM tips t WHERE t.public_id = $1", tip_id)

    async def _by_id(self, id_: int) -> asyncpg.Record:
        return await self.db.fetchrow(f"SELECT {TIP_COLUMNS} FROM tips t WHERE t.id = $1",
                                      id_)

    # -- sending ---------------------------------------------------------------------
    async def send(self, *, drop: dict[str, Any], user_id: str, display_name: str,
                   amount: int, message: str, idempotency_key: str
                   ) -> tuple[asyncpg.Record, Intent | None]:
        """Record the tip and ask for its PaymentIntent; returns the tip and its intent
        (None when it was settled before: a retried request). The same key with
        another amount or message is ``409 idempotency_mismatch``."""
        if amount not in (drop["tip_amounts"] or []):
            raise TipError(f"amount must be one of the drop's tip amounts "
                           f"{list(drop['tip_amounts'] or [])}", "tip_amount_not_offered",
                           422)
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO tips (public_id, drop_id, user_id, display_name, amount,
                       currency, message, idempotency_key, gateway)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (user_id, drop_id, idempotency_key) DO NOTHING""",
                f"tip_{secrets.token_hex(12)}", drop["id"], user_id, display_name, amount,
                drop["currency"], message, idempotency_key, self.gateway.name)
            row = await conn.fetchrow(
                f"SELECT {TIP_COLUMNS} FROM tips t WHERE t.user_id = $1 AND t.drop_id = $2 "
                "AND t.idempotency_key = $3", user_id, drop["id"], idempotency_key)
        if row["amount"] != amount or row["message"] != message:
            raise TipError("this idempotency key was used for another tip",
                           "idempotency_mismatch")
        if row["state"] != "payment_pending":
            return row, None
        intent = await self._intent(row)
        await self.apply_intent(row, intent)
        return await self._by_id(row["id"]), intent

    async def _intent(self, row: asyncpg.Record) -> Intent:
        """The tip's intent: made once (``pi:tip:<id>``), then re-read."""
        if row["intent_id"] is not None:
            return await self.gateway.retrieve_intent(row["intent_id"])
        await self.db.execute("UPDATE tips SET payment_requested = true "
                              "WHERE id = $1 AND NOT payment_requested", row["id"])
        try:
            intent = await self.gateway.create_intent(
                amount=row["amount"], currency=row["currency"].strip(),
                idempotency_key=f"pi:tip:{row['public_id']}", flow=Flow.CLIENT_CONFIRM,
                transfer_group=transfer_group(row["drop_id"]),
                metadata={"tip_id": row["public_id"], "drop_id": str(row["drop_id"]),
                          "kind": "tip"})
        except GatewayError as exc:
            if not exc.retryable and exc.code != "idempotency_error":
                # refused: no intent exists, so none may be found later
                await self.db.execute("UPDATE tips SET payment_requested = false, "
                                      "state = 'failed', last_error = $2, updated_at = now() "
                                      "WHERE id = $1 AND state = 'payment_pending'",
                                      row["id"], exc.code)
            raise
        await self.db.execute(
            "UPDATE tips SET intent_id = $2, status = $3, updated_at = now() "
            "WHERE id = $1 AND intent_id IS NULL", row["id"], intent.id, intent.status.value)
        return intent

    # -- applying what the gateway says -------------------------------------------------
    async def apply_intent(self, row: asyncpg.Record, intent: Intent) -> str:
        """Record the intent on the tip and move the tip by it; returns the state."""
        paid = intent.status is IntentStatus.SUCCEEDED
        target = {IntentStatus.SUCCEEDED: "paid",
                  IntentStatus.CANCELED: "cancelled"}.get(intent.status)
        async with self.db.acquire() as conn, conn.transaction():
            moved = await conn.fetchrow(
                """UPDATE tips SET status = $2, amount_received = GREATEST(amount_received, $3),
                       fee = GREATEST(fee, $4), last_error = $5, updated_at = now(),
                       state = COALESCE($6, state),
                       paid_at = CASE WHEN $6 = 'paid' THEN now() ELSE paid_at END
                   WHERE id = $1 AND ($6::text IS NULL OR state = 'payment_pending')
                   RETURNING state""",
                row["id"], intent.status.value, intent.amount_received, intent.fee,
                intent.error_code, target)
            if moved is not None and paid:
                drop = await conn.fetchrow("SELECT creator_id FROM drops WHERE id = $1",
                                           row["drop_id"])
                await enqueue(conn, EventType.TIP_PAID, {
                    **_room_event(row), "drop_id": row["drop_id"],
                    "amount_received": intent.amount_received},
                    creator_id=drop["creator_id"], drop_id=row["drop_id"],
                    key=f"tip.paid:{row['public_id']}")
        current = await self._by_id(row["id"])
        if current["state"] == "paid" and not current["announced"]:
            await self.announce(current)
        elif current["state"] in ("cancelled", "failed", "refunded") and paid:
            # paid after it was given up on (an abandoned tip's late confirm): give the
            # money back, as for a late order payment
            await self._refund(current, intent, reason="paid after cancellation")
        return current["state"]

    async def announce(self, row: asyncpg.Record) -> None:
        """The room's highlighted ``tip`` event: published, then marked (at least
        once)."""
        await publish(self.redis, row["drop_id"], "tip", _room_event(row))
        await self.db.execute("UPDATE tips SET announced = true WHERE id = $1", row["id"])

    async def apply_intent_id(self, intent_id: str) -> bool:
        """A webhook's PaymentIntent, if it is a tip's: re-read and applied."""
        row = await self.db.fetchrow(
            f"SELECT {TIP_COLUMNS} FROM tips t WHERE t.intent_id = $1", intent_id)
        if row is None:
            return False
        await self.apply_intent(row, await self.gateway.retrieve_intent(intent_id))
        return True

    # -- refunds -----------------------------------------------------------------------
    async def refund(self, row: asyncpg.Record) -> asyncpg.Record:
        """Refund a paid tip in full (the creator's or an admin's decision)."""
        if row["state"] == "refunded":
            return row
        if row["state"] != "paid" or row["intent_id"] is None:
            raise TipError(f"the tip is {row['state']}", "charge_not_refundable")
        intent = await self.gateway.retrieve_intent(row["intent_id"])
        await self._refund(row, intent, reason="creator")
        return await self._by_id(row["id"])

    async def _refund(self, row: asyncpg.Record, intent: Intent, *, reason: str) -> None:
        charge = await refund_in_full(self.gateway, intent,
                                      key=f"refund:tip:{row['public_id']}")
        log.warning("refunded a tip", extra={"tip_id": row["public_id"], "reason": reason,
                                             "amount": charge.amount_refunded})
        await self.record_refund(row, charge.amount_refunded, full=charge.refunded)

    async def record_refund(self, row: asyncpg.Record, amount_refunded: int, *,
                            full: bool) -> None:
        """Store the refunded amount; a full refund makes the tip ``refunded``; the
        ledger is reversed if the drop was settled. Idempotent."""
        await self.db.execute(
            """UPDATE tips SET amount_refunded = GREATEST(amount_refunded, $2),
                   state = CASE WHEN $3 THEN 'refunded' ELSE state END, updated_at = now(),
                   refunded_at = CASE WHEN $3 THEN COALESCE(refunded_at, now())
                                      ELSE refunded_at END
               WHERE id = $1""", row["id"], amount_refunded, full)
        if self.on_refunded is not None:
            await self.on_refunded(row["drop_id"])

    async def record_refund_for_intent(self, intent_id: str, amount_refunded: int, *,
                                       full: bool) -> bool:
        row = await self.db.fetchrow(
            f"SELECT {TIP_COLUMNS} FROM tips t WHERE t.intent_id = $1", intent_id)
        if row is None:
            return False
        await self.record_refund(row, amount_refunded, full=full)
        return True

    # -- the sweep -----------------------------------------------------------------------
    async def sweep(self) -> dict[str, int]:
        """What a lost webhook, a crash or an abandoned payment left behind: pending
        tips re-read from the gateway (and their intent asked for again when the crash
        came before its row), abandoned ones cancelled, paid ones the room missed
        announced. Returns how many of each it handled."""
        done = {"reread": 0, "cancelled": 0, "announced": 0}
        rows = await self.db.fetch(
            f"""SELECT {TIP_COLUMNS}, t.updated_at < now() - make_interval(secs => $2)
                       AS abandoned
                FROM tips t WHERE t.state = 'payment_pending'
                  AND t.updated_at < now() - make_interval(secs => $1)
                ORDER BY t.id LIMIT 200""", SWEEP_AFTER_S, ABANDON_AFTER_S)
        for row in rows:
            if row["intent_id"] is None and not row["payment_requested"]:
                continue  # never asked for: the request died before; nothing charged
            intent = await self._intent(row)
            if row["abandoned"] and intent.status in _CANCELLABLE:
                try:
                    intent = await self.gateway.cancel_intent(
                        intent.id, idempotency_key=f"cancel:tip:{row['public_id']}")
                    done["cancelled"] += 1
                except GatewayError as exc:
                    if exc.code != "payment_intent_unexpected_state":
                        raise
                    intent = await self.gateway.retrieve_intent(intent.id)
            await self.apply_intent(row, intent)
            done["reread"] += 1
        missed = await self.db.fetch(
            f"""SELECT {TIP_COLUMNS} FROM tips t WHERE t.state = 'paid' AND NOT t.announced
                AND t.paid_at > now() - make_interval(secs => $1) ORDER BY t.id LIMIT 200""",
            ANNOUNCE_WITHIN_S)
        for row in missed:
            await self.announce(row)
            done["announced"] += 1
        return done

    # -- totals ------------------------------------------------------------------------
    async def totals(self, drop_id: int) -> dict[str, Any]:
        """Paid tips of the drop: how many, how much (refunds subtracted), the top
        tippers; what the console shows."""
        row = await self.db.fetchrow(
            """SELECT count(*) FILTER (WHERE state IN ('paid', 'refunded')) AS count,
                      COALESCE(sum(amount_received) FILTER (
                          WHERE state IN ('paid', 'refunded')), 0) AS gross,
                      COALESCE(sum(amount_refunded), 0) AS refunded,
                      count(*) FILTER (WHERE state = 'payment_pending') AS pending
               FROM tips WHERE drop_id = $1""", drop_id)
        top = await self.db.fetch(
            """SELECT user_id, max(display_name) AS name,
                      sum(amount_received - amount_refunded) AS amount
               FROM tips WHERE drop_id = $1 AND state = 'paid'
               GROUP BY user_id ORDER BY 3 DESC, 1 LIMIT 5""", drop_id)
        return {"count": row["count"], "gross": int(row["gross"]),
                "refunded": int(row["refunded"]),
                "net": int(row["gross"]) - int(row["refunded"]),
                "pending": row["pending"],
                "top": [{"user_id": r["user_id"], "name": r["name"],
                         "amount": int(r["amount"])} for r in top]}
