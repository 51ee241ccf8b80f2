"""Outbound webhooks: the events, :func:`enqueue`, signing and the endpoint URL rule.

This is what the rest of the server calls: :func:`enqueue` writes one event into the
outbox table ``outbound_events`` **on the caller's connection, inside the caller's
transaction**, so the event exists exactly when the state change that caused it
committed (a transactional outbox: an ``order.paid`` can neither be sent for a payment
that rolled back nor lost for one that committed). It costs one INSERT and never waits
on a receiver: :mod:`dropserver.outbound_delivery` fans events out to the registered
endpoints and sends them in the background, at least once, with retries. The same
statement sends a ``NOTIFY`` on :data:`NOTIFY_CHANNEL`, which PostgreSQL delivers when
the transaction commits: it wakes the dispatcher, which does not poll for new events.

Signing follows the Standard Webhooks specification (standardwebhooks.com) with its
reference library (``standardwebhooks``): headers ``webhook-id`` (the event id, the
same on every retry: receivers deduplicate on it), ``webhook-timestamp`` (Unix
seconds of the attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``, space-separated when a rotated secret still signs beside the
new one). docs/topics/webhooks.md has the receiver's recipe.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import json
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from standardwebhooks.webhooks import Webhook

__all__ = ["EVENT_TYPES", "NOTIFY_CHANNEL", "EventType", "UrlRefused", "check_url",
           "enqueue", "envelope", "new_secret", "signature_headers"]

# PostgreSQL's channel that wakes the dispatcher (dropserver.outbound_delivery) when an
# event is queued, a delivery replayed or an endpoint enabled.
NOTIFY_CHANNEL = "outbound_webhooks"


class EventType(enum.StrEnum):
    """Every event an endpoint can ask for (docs/topics/webhooks.md lists their data)."""

    DROP_SCHEDULED = "drop.scheduled"
    DROP_LIVE = "drop.live"
    DROP_REMINDER = "drop.reminder"
    ORDER_PAID = "order.paid"
    ORDER_REFUNDED = "order.refunded"
    TIP_PAID = "tip.paid"
    PAYOUT_SENT = "payout.sent"


EVENT_TYPES: tuple[str, ...] = tuple(e.value for e in EventType)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def envelope(event_id: str, event_type: str, data: Mapping[str, Any],
             at: datetime) -> str:
    """The JSON body every attempt of the event sends, byte for byte:
    ``{"id", "type", "timestamp", "data"}`` (Standard Webhooks' payload shape)."""
    return json.dumps({"id": event_id, "type": event_type, "timestamp": _jsonable(at),
                       "data": dict(data)}, default=_jsonable, separators=(",", ":"),
                      ensure_ascii=False)


async def enqueue(conn: asyncpg.Connection | asyncpg.Pool, event_type: EventType | str,
                  data: Mapping[str, Any], *, creator_id: str | None,
                  drop_id: int | None = None, key: str | None = None) -> str | None:
    """Queue ``event_type`` with ``data`` for every endpoint that asked for it; the one
    function to call to send an outbound webhook.

    Call it with the connection of the transaction that makes the change the event
    reports (``async with pool.acquire() as conn, conn.transaction(): ...; await
    enqueue(conn, ...)``): the event commits or rolls back with it. ``creator_id``: the
    creator whose endpoints hear it (platform endpoints hear every event; None: only
    they do). ``key``: makes a second enqueue of the same fact a no-op (e.g.
    ``"order.paid:<order id>"``); None never deduplicates. ``data`` must be JSON (dates
    and datetimes are written as ISO 8601). Returns the event id (the ``webhook-id``
    receivers see), or None when ``key`` was queued before.
    """
    kind = EventType(event_type).value  # ValueError for an unknown type
    event_id = f"msg_{uuid.uuid4().hex}"
    at = datetime.now(UTC)
    body = envelope(event_id, kind, data, at)
    # The NOTIFY is the transaction's: PostgreSQL sends it at commit, never on rollback,
    # and once however many events the transaction queued.
    row = await conn.fetchval(
        """WITH ev AS (
               INSERT INTO outbound_events (id, type, creator_id, drop_id, dedupe_key,
                   body, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (dedupe_key) DO NOTHING RETURNING id)
           SELECT id, pg_notify($8, '') FROM ev""",
        event_id, kind, creator_id, drop_id, key, body, at, NOTIFY_CHANNEL)
    return row


# -- signing -----------------------------------------------------------------------------

_SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh endpoint secret: ``whsec_`` and 32 random bytes in base64 (the form
    Standard Webhooks' libraries take)."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature_headers(event_id: str, body: str, secrets_: list[str], *,
                      at: datetime | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt, signed with each secret in
    ``secrets_`` (the current one, and a rotated one while it is still valid)."""
    at = at or datetime.now(UTC)
    signatures = [Webhook(s).sign(event_id, at, body) for s in secrets_]
    return {"webhook-id": event_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": " ".join(signatures)}


# -- endpoint URLs -----------------------------------------------------------------------

class UrlRefused(ValueError):
    """An endpoint URL the server will not send to; the message says why."""


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_http_loopback: bool) -> str:
    """``url`` if webhooks may be sent to it, else :class:`UrlRefused`.

    ``https://`` with a host name or a public address. Plain ``http://`` only to a
    loopback host (127.0.0.0/8, ::1, localhost) and only where
    ``allow_http_loopback`` (``dropserver dev``, or
    ``DROPSERVER_WEBHOOK_ALLOW_HTTP_LOOPBACK=1`` for tests): a receiver on the same
    machine. A literal private, link-local or loopback address is refused over https
    in production too (it would let a creator make the server call inside its own
    network); names are not resolved here."""
    if len(url) > 2048:
        raise UrlRefused("url must be at most 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"url is not a URL: {exc}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise UrlRefused("url must be an absolute https:// URL")
    if parts.username or parts.password:
        raise UrlRefused("url must not carry credentials (user:password@)")
    if parts.fragment:
        raise UrlRefused("url must not have a #fragment")
    if port == 0:
        raise UrlRefused("url has port 0")
    loopback = _is_loopback(host)
    if parts.scheme == "http":
        if not (loopback and allow_http_loopback):
            raise UrlRefused("url must be https:// (plain http:// only to a loopback "
                             "receiver under dropserver dev)")
        return url
    if not allow_http_loopback:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            addr = None
        if addr is not None and not addr.is_global:
            raise UrlRefused("url must not point at a private, loopback or link-local "
                             "address")
    return url
