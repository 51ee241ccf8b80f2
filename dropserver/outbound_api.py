"""Outbound webhooks over HTTP: endpoints, the delivery log, replay; the dispatcher's
start and stop.

* ``POST /v1/webhooks/endpoints`` -- a creator (their own events) or an admin (every
  creator's: a platform endpoint) registers ``url`` for ``events``; the answer carries
  the signing ``secret``, the only time it is shown but for a rotation.
* ``GET /v1/webhooks/endpoints``, ``GET``/``PATCH``/``DELETE
  /v1/webhooks/endpoints/{id}`` -- list, read, change (url, events, description,
  enabled), remove.
* ``POST /v1/webhooks/endpoints/{id}/rotate-secret`` -- a new secret; the old one keeps
  signing beside it for ``previous_valid_for_s`` (default a day, 0: not at all).
* ``GET /v1/webhooks/endpoints/{id}/deliveries`` -- the delivery log, newest first
  (``state``, ``limit``, ``before``).
* ``GET /v1/webhooks/deliveries/{id}`` -- one delivery, its attempts and its body.
* ``POST /v1/webhooks/deliveries/{id}/replay`` -- send it again now, with a fresh
  retry schedule.

A creator sees only their own endpoints (another's answers 404); an admin sees all.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dropserver.auth import Principal, Role, require
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError, NotFound, ValidationFailed
from dropserver.http import field, parse_int, read_json, reject_unknown
from dropserver.outbound import (
    EVENT_TYPES,
    NOTIFY_CHANNEL,
    UrlRefused,
    check_url,
    new_secret,
)
from dropserver.outbound_delivery import Dispatcher, replay

__all__ = ["component"]

log = logging.getLogger("dropserver.webhooks")

MAX_ENDPOINTS = 16  # per owner, as Stripe allows per account
_ENDPOINT_COLS = ("id, owner_id, scope, url, description, events, enabled, created_at, "
                  "updated_at, previous_secret_expires_at")
_DELIVERY_COLS = ("d.id, d.event_id, ev.type AS event_type, d.endpoint_id, d.state, "
                  "d.attempts, d.next_attempt_at, d.last_status, d.last_error, "
                  "d.last_attempt_at, d.delivered_at, d.created_at")
_STATES = ("pending", "delivered", "failed")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00",
                                                                                  "Z")


def _endpoint_json(row: asyncpg.Record, secret: str | None = None) -> dict[str, Any]:
    out = {"id": row["id"], "owner_id": row["owner_id"], "scope": row["scope"],
           "url": row["url"], "description": row["description"],
           "events": list(row["events"]), "enabled": row["enabled"],
           "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
           "previous_secret_expires_at": _iso(row["previous_secret_expires_at"])}
    if secret is not None:
        out["secret"] = secret
    return out


def _delivery_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "event_id": row["event_id"], "event_type": row["event_type"],
            "endpoint_id": row["endpoint_id"], "state": row["state"],
            "attempts": row["attempts"], "next_attempt_at": _iso(row["next_attempt_at"]),
            "last_status": row["last_status"], "last_error": row["last_error"],
            "last_attempt_at": _iso(row["last_attempt_at"]),
            "delivered_at": _iso(row["delivered_at"]), "created_at": _iso(row["created_at"])}


# -- input -------------------------------------------------------------------------

def _url(request: Request, data: dict[str, Any]) -> str:
    url = field(data, "url", str, max_len=2048)
    settings = request.app.state.settings
    try:
        return check_url(url, allow_http_loopback=settings.dev
                         or settings.webhook_allow_http_loopback)
    except UrlRefused as exc:
        raise ValidationFailed(str(exc), code="webhook_url_refused",
                               details={"field": "url"}) from None


def _events(data: dict[str, Any]) -> list[str]:
    events = field(data, "events", list, max_len=len(EVENT_TYPES) * 2)
    if not events:
        raise ValidationFailed("events must name at least one event type",
                               details={"field": "events"})
    out: list[str] = []
    for i, name in enumerate(events):
        if not isinstance(name, str) or name not in EVENT_TYPES:
            raise ValidationFailed(f"events[{i}] must be one of {', '.join(EVENT_TYPES)}",
                                   details={"field": f"events[{i}]"})
        if name not in out:
            out.append(name)
    return out


def _description(data: dict[str, Any]) -> str | None:
    return field(data, "description", str, default=None, max_len=500)


# -- access ------------------------------------------------------------------------

async def _endpoint(request: Request, who: Principal) -> asyncpg.Record:
    endpoint_id = request.path_params["endpoint_id"]
    row = await request.app.state.db.fetchrow(
        f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints WHERE id = $1", endpoint_id)
    if row is None or not (who.role is Role.ADMIN or row["owner_id"] == who.user_id):
        raise NotFound(f"webhook endpoint {endpoint_id} does not exist",
                       code="webhook_endpoint_not_found")
    return row


# -- routes ------------------------------------------------------------------------

async def create_endpoint(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    data = await read_json(request)
    reject_unknown(data, ("url", "events", "description"))
    url = _url(request, data)
    events = _events(data)
    description = _description(data) or ""
    scope = "platform" if who.role is Role.ADMIN else "creator"
    secret = new_secret()
    db = request.app.state.db
    async with db.acquire() as conn, conn.transaction():
        # one owner's registrations take turns, so the limit holds under a race
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"webhook_endpoints:{who.user_id}")
        count = await conn.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE owner_id = $1", who.user_id)
        if count >= MAX_ENDPOINTS:
            raise ApiError(f"at most {MAX_ENDPOINTS} webhook endpoints per account",
                           code="too_many_endpoints", status=409)
        row = await conn.fetchrow(
            f"""INSERT INTO webhook_endpoints (owner_id, scope, url, description, events,
                    secret)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_ENDPOINT_COLS}""",
            who.user_id, scope, url, description, events, secret)
    log.info("webhook endpoint registered", extra={"endpoint_id": row["id"],
                                                   "user_id": who.user_id, "scope": scope})
    return JSONResponse(_endpoint_json(row, secret), status_code=201,
                        headers={"Location": f"/v1/webhooks/endpoints/{row['id']}"})


async def list_endpoints(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    db = request.app.state.db
    if who.role is Role.ADMIN:
        rows = await db.fetch(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints ORDER BY id")
    else:
        rows = await db.fetch(f"SELECT {_ENDPOINT_COLS} FROM webhook_endpoints "
                              "WHERE owner_id = $1 ORDER BY id", who.user_id)
    return JSONResponse({"endpoints": [_endpoint_json(r) for r in rows]})


async def get_endpoint(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    return JSONResponse(_endpoint_json(await _endpoint(request, who)))


async def patch_endpoint(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row = await _endpoint(request, who)
    data = await read_json(request)
    reject_unknown(data, ("url", "events", "description", "enabled"))
    values: dict[str, Any] = {}
    if data.get("url") is not None:
        values["url"] = _url(request, data)
    if data.get("events") is not None:
        values["events"] = _events(data)
    if data.get("description") is not None:
        values["description"] = _description(data)
    if data.get("enabled") is not None:
        values["enabled"] = field(data, "enabled", bool)
    if values:
        names = sorted(values)
        sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
        row = await request.app.state.db.fetchrow(
            f"UPDATE webhook_endpoints SET {sets}, updated_at = now() WHERE id = $1 "
            f"RETURNING {_ENDPOINT_COLS}", row["id"], *[values[n] for n in names])
        if row is None:
            raise NotFound("webhook endpoint was removed meanwhile",
                           code="webhook_endpoint_not_found")
        if values.get("enabled"):  # its pending deliveries are due: wake the dispatcher
            await request.app.state.db.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return JSONResponse(_endpoint_json(row))


async def delete_endpoint(request: Request) -> Response:
    who = await require(request, Role.CREATOR)
    row = await _endpoint(request, who)
    await request.app.state.db.execute("DELETE FROM webhook_endpoints WHERE id = $1",
                                       row["id"])
    return Response(status_code=204)


async def rotate_secret(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row = await _endpoint(request, who)
    data = await read_json(request)
    reject_unknown(data, ("previous_valid_for_s",))
    keep = field(data, "previous_valid_for_s", int, default=86400, min_value=0,
                 max_value=7 * 86400)
    secret = new_secret()
    until = datetime.now(UTC) + timedelta(seconds=keep) if keep else None
    row = await request.app.state.db.fetchrow(
        f"""UPDATE webhook_endpoints SET previous_secret = secret, secret = $2,
                previous_secret_expires_at = $3, updated_at = now()
            WHERE id = $1 RETURNING {_ENDPOINT_COLS}""", row["id"], secret, until)
    if row is None:
        raise NotFound("webhook endpoint was removed meanwhile",
                       code="webhook_endpoint_not_found")
    return JSONResponse(_endpoint_json(row, secret))


async def list_deliveries(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    endpoint = await _endpoint(request, who)
    q = request.query_params
    state = q.get("state")
    if state is not None and state not in _STATES:
        raise ValidationFailed(f"state must be one of {', '.join(_STATES)}",
                               details={"field": "state"})
    limit = parse_int(q["limit"], "limit", low=1, high=200) if "limit" in q else 50
    before = parse_int(q["before"], "before", low=1) if "before" in q else None
    rows = await request.app.state.db.fetch(
        f"""SELECT {_DELIVERY_COLS} FROM webhook_deliveries d
            JOIN outbound_events ev ON ev.id = d.event_id
            WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.state = $2)
              AND ($3::bigint IS NULL OR d.id < $3)
            ORDER BY d.id DESC LIMIT $4""", endpoint["id"], state, before, limit)
    out = [_delivery_json(r) for r in rows]
    return JSONResponse({"deliveries": out,
                         "next_before": out[-1]["id"] if len(out) == limit else None})


async def _delivery(request: Request, who: Principal) -> asyncpg.Record:
    delivery_id = request.path_params["delivery_id"]
    row = await request.app.state.db.fetchrow(
        f"""SELECT {_DELIVERY_COLS}, ev.body, e.owner_id FROM webhook_deliveries d
            JOIN outbound_events ev ON ev.id = d.event_id
            JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE d.id = $1""",
        delivery_id)
    if row is None or not (who.role is Role.ADMIN or row["owner_id"] == who.user_id):
        raise NotFound(f"webhook delivery {delivery_id} does not exist",
                       code="webhook_delivery_not_found")
    return row


async def get_delivery(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row = await _delivery(request, who)
    attempts = await request.app.state.db.fetch(
        "SELECT attempt, status, error, duration_ms, at FROM webhook_attempts "
        "WHERE delivery_id = $1 ORDER BY id", row["id"])
    return JSONResponse({**_delivery_json(row), "payload": json.loads(row["body"]),
                         "attempt_log": [{"attempt": a["attempt"], "status": a["status"],
                                          "error": a["error"],
                                          "duration_ms": a["duration_ms"],
                                          "at": _iso(a["at"])} for a in attempts]})


async def replay_delivery(request: Request) -> JSONResponse:
    who = await require(request, Role.CREATOR)
    row = await _delivery(request, who)
    reject_unknown(await read_json(request), ())
    queued = await replay(request.app.state.db, row["id"])
    log.info("webhook delivery replayed", extra={"delivery_id": row["id"],
                                                 "user_id": who.user_id,
                                                 "queued": queued})
    return JSONResponse({"id": row["id"], "state": "pending", "replayed": queued},
                        status_code=202)


# -- lifecycle -----------------------------------------------------------------------

async def _startup(app: Starlette) -> None:
    settings = app.state.settings
    app.state.webhook_dispatcher = None
    if settings.webhook_concurrency > 0:
        dispatcher = Dispatcher(
            app.state.db, schedule=[float(s) for s in settings.webhook_retry_schedule],
            timeout=settings.webhook_timeout, concurrency=settings.webhook_concurrency,
            poll_interval=settings.webhook_poll_interval,
            fallback_poll=settings.webhook_fallback_poll, dsn=settings.database_url or None,
            retention_days=settings.webhook_retention_days)
        if chores(app):  # one dispatcher per node (dropserver.chores)
            dispatcher.start()
        app.state.webhook_dispatcher = dispatcher


async def _shutdown(app: Starlette) -> None:
    dispatcher = getattr(app.state, "webhook_dispatcher", None)
    if dispatcher is not None:
        await dispatcher.stop()


_E = "/v1/webhooks/endpoints"
_D = "/v1/webhooks/deliveries"

component = Component(
    name="webhooks",
    routes=[
        Route(_E, create_endpoint, methods=["POST"]),
        Route(_E, list_endpoints, methods=["GET"]),
        Route(_E + "/{endpoint_id:id}", get_endpoint, methods=["GET"]),
        Route(_E + "/{endpoint_id:id}", patch_endpoint, methods=["PATCH"]),
        Route(_E + "/{endpoint_id:id}", delete_endpoint, methods=["DELETE"]),
        Route(_E + "/{endpoint_id:id}/rotate-secret", rotate_secret, methods=["POST"]),
        Route(_E + "/{endpoint_id:id}/deliveries", list_deliveries, methods=["GET"]),
        Route(_D + "/{delivery_id:id}", get_delivery, methods=["GET"]),
        Route(_D + "/{delivery_id:id}/replay", replay_delivery, methods=["POST"]),
    ],
    startup=_startup,
    shutdown=_shutdown,
)
