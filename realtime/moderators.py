"""Moderators a creator appoints, the per-process cache the chat reads, and the audit.

* A creator (or an admin for them) appoints moderators by user id for all of the
  creator's drops: ``PUT /v1/creators/{creator_id}/moderators/{user_id}``. A
  moderator may delete, mute, ban, unban, pin and set slow mode in the chat of those
  drops (realtime.chat), never touch sales: every route of the creator's sales (the
  drop's lifecycle and products, auctions, giveaways, tips, refunds of orders and
  tips, stats, settlement, the broadcast, the reminder list) answers a moderator 403
  ``moderator_not_allowed`` (:func:`guard_sales`).
* The chat asks :meth:`ModeratorCache.is_moderator` for every message (the staff
  skip the rate limit and slow mode, and their messages are always delivered in a
  sampled room): it answers from memory, reading ``creator_moderators`` at most once
  per creator every :data:`CACHE_SECONDS` per process. An appointment or dismissal
  takes effect at once on the process that made it and within that time on the others.
* Every moderation action is a row of ``chat_moderation`` (who, what, whom, when, in
  which drop): ``GET /v1/drops/{drop_id}/moderation`` lists them for the creator, the
  drop's moderators and admins (the console shows it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dropserver.auth import Principal, principal, require
from dropserver.errors import ApiError, Forbidden, NotFound, ValidationFailed
from dropserver.http import MAX_ID, parse_int, read_json, reject_unknown
from dropserver.text import text_problem

__all__ = ["CACHE_SECONDS", "ModeratorCache", "audit", "drop_creator", "guard_sales",
           "is_moderator_of", "moderator_of", "record", "refuse_sales", "routes"]

CACHE_SECONDS = 2.0
MAX_USER_ID_LEN = 128
MAX_MODERATORS = 100


class ModeratorCache:
    """Each creator's moderators, in memory for :data:`CACHE_SECONDS` per process."""

    def __init__(self, db: Any, ttl: float = CACHE_SECONDS) -> None:
        self.db = db
        self.ttl = ttl
        self._sets: dict[str, tuple[float, frozenset[str]]] = {}
        self._loading: dict[str, asyncio.Future[frozenset[str]]] = {}
        self.loads = 0

    def invalidate(self, creator_id: str) -> None:
        self._sets.pop(creator_id, None)

    async def of(self, creator_id: str) -> frozenset[str]:
        entry = self._sets.get(creator_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        pending = self._loading.get(creator_id)
        if pending is not None:  # one read per creator however many messages wait
            return await asyncio.shield(pending)
        future: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()
        self._loading[creator_id] = future
        try:
            rows = await self.db.fetch(
                "SELECT user_id FROM creator_moderators WHERE creator_id = $1", creator_id)
            found = frozenset(r["user_id"] for r in rows)
            self.loads += 1
            self._sets[creator_id] = (time.monotonic() + self.ttl, found)
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it unread
            raise
        finally:
            self._loading.pop(creator_id, None)

    async def is_moderator(self, creator_id: str | None, user_id: str | None) -> bool:
        if not creator_id or not user_id:
            return False
        return user_id in await self.of(creator_id)


async def is_moderator_of(db: Any, creator_id: str, user_id: str | None) -> bool:
    """The same question read from PostgreSQL (off the chat path: a refusal's code)."""
    if not user_id:
        return False
    return bool(await db.fetchval(
        "SELECT 1 FROM creator_moderators WHERE creator_id = $1 AND user_id = $2",
        creator_id, user_id))


async def moderator_of(db: Any, user_id: str | None) -> list[str]:
    """The creators whose drops ``user_id`` moderates (``GET /v1/me``)."""
    if not user_id:
        return []
    rows = await db.fetch("SELECT creator_id FROM creator_moderators WHERE user_id = $1 "
                          "ORDER BY creator_id", user_id)
    return [r["creator_id"] for r in rows]


async def record(db: Any, *, action: str, creator_id: str | None, in_drop_id: int | None,
                 user_id: str, moderator_id: str, drop_id: int | None = None,
                 message_id: str | None = None, reason: str = "", seconds: int | None = None,
                 expires_in: float | None = None) -> None:
    """One audit row (mutes and bans are also what realtime.chat enforces from)."""
    await db.execute(
        """INSERT INTO chat_moderation (drop_id, creator_id, user_id, action, message_id,
                                        reason, moderator_id, in_drop_id, seconds, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                   CASE WHEN $10::float8 IS NULL THEN NULL
                        ELSE now() + make_interval(secs => $10::float8) END)""",
        drop_id, creator_id, user_id, action, message_id, reason, moderator_id, in_drop_id,
        seconds, expires_in)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def audit(db: Any, drop_id: int, creator_id: str, *, limit: int = 50,
                before: int | None = None) -> list[dict[str, Any]]:
    """The drop's moderation, newest first: its own actions and the creator's bans and
    appointments (they hold in every drop)."""
    rows = await db.fetch(
        """SELECT id, action, user_id, moderator_id, message_id, reason, seconds,
                  expires_at, lifted_at, created_at, drop_id, in_drop_id
           FROM chat_moderation
           WHERE (in_drop_id = $1 OR drop_id = $1
                  OR (creator_id = $2 AND action IN ('ban', 'unban', 'appoint', 'dismiss')))
             AND ($3::bigint IS NULL OR id < $3)
           ORDER BY id DESC LIMIT $4""",
        drop_id, creator_id, before, limit)
    return [{"id": r["id"], "action": r["action"], "user_id": r["user_id"],
             "moderator_id": r["moderator_id"], "message_id": r["message_id"],
             "reason": r["reason"], "seconds": r["seconds"],
             "expires_at": _iso(r["expires_at"]), "lifted_at": _iso(r["lifted_at"]),
             "drop_id": r["in_drop_id"] or r["drop_id"], "at": _iso(r["created_at"])}
            for r in rows]


class ModeratorNotAllowed(ApiError):
    status = 403
    code = "moderator_not_allowed"


async def refuse_sales(db: Any, who: Principal, creator_id: str | None) -> None:
    """Raise 403 ``moderator_not_allowed`` when ``who`` is one of the creator's
    moderators (called where a sales route is about to refuse someone who is not the
    creator: the moderator learns why, not just "forbidden")."""
    if creator_id and not who.is_guest and await is_moderator_of(db, creator_id,
                                                                   who.user_id):
        raise ModeratorNotAllowed("moderators moderate the chat; sales are the creator's")


async def drop_creator(request: Request) -> str | None:
    """The creator of the drop named by the route's ``{drop_id}``."""
    return await request.app.state.db.fetchval(
        "SELECT creator_id FROM drops WHERE id = $1", request.path_params.get("drop_id"))


def guard_sales(endpoint: Callable[[Request], Awaitable[Response]], *,
                creator_of: Callable[[Request], Awaitable[str | None]] = drop_creator,
                hidden: tuple[str, ...] = (),
                ) -> Callable[[Request], Awaitable[Response]]:
    """A route of the creator's sales whose refusal of someone who is not the creator
    (403 ``forbidden_role`` / ``not_drop_owner``, or a 404 whose code is in ``hidden``:
    a route that does not tell strangers the thing exists) becomes 403
    ``moderator_not_allowed`` for one of that creator's moderators. ``creator_of``
    names the creator from the request: the drop in the path by default; a route
    named by an order's or a tip's own id passes its own."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (Forbidden, NotFound) as exc:
            if exc.code not in ("forbidden_role", "not_drop_owner", *hidden):
                raise
            await refuse_sales(request.app.state.db, await principal(request),
                               await creator_of(request))
            raise

    return guarded


# -- HTTP -------------------------------------------------------------------------------

def _user_id(raw: str, name: str) -> str:
    if not raw or len(raw) > MAX_USER_ID_LEN or text_problem(raw) is not None:
        raise ValidationFailed(f"{name} must be a user id of 1 to {MAX_USER_ID_LEN} "
                               "characters", details={"field": name})
    return raw


async def _owner(request: Request) -> tuple[Principal, str]:
    """The caller, who must be the creator named in the path or an admin."""
    who = await require(request)
    creator_id = _user_id(request.path_params["creator_id"], "creator_id")
    if not who.can_manage(creator_id):
        raise Forbidden("only the creator (or an admin) appoints their moderators",
                        code="not_drop_owner")
    return who, creator_id


def _cache(request: Request) -> ModeratorCache | None:
    return getattr(request.app.state, "moderators", None)


async def list_moderators(request: Request) -> JSONResponse:
    _, creator_id = await _owner(request)
    rows = await request.app.state.db.fetch(
        "SELECT user_id, appointed_by, created_at FROM creator_moderators "
        "WHERE creator_id = $1 ORDER BY created_at, user_id", creator_id)
    return JSONResponse({"moderators": [
        {"user_id": r["user_id"], "appointed_by": r["appointed_by"],
         "appointed_at": _iso(r["created_at"])} for r in rows]})


async def appoint(request: Request) -> JSONResponse:
    who, creator_id = await _owner(request)
    user_id = _user_id(request.path_params["user_id"], "user_id")
    reject_unknown(await read_json(request), ())
    if user_id == creator_id:
        raise ValidationFailed("a creator moderates their own drops already",
                               details={"field": "user_id"})
    db = request.app.state.db
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"moderators:{creator_id}")
        exists = await conn.fetchval(
            "SELECT 1 FROM creator_moderators WHERE creator_id = $1 AND user_id = $2",
            creator_id, user_id)
        if not exists:
            count = await conn.fetchval(
                "SELECT count(*) FROM creator_moderators WHERE creator_id = $1", creator_id)
            if count >= MAX_MODERATORS:
                raise ValidationFailed(f"at most {MAX_MODERATORS} moderators per creator",
                                       details={"field": "user_id"})
            await conn.execute(
                "INSERT INTO users (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", creator_id)
            await conn.execute(
                "INSERT INTO creator_moderators (creator_id, user_id, appointed_by) "
                "VALUES ($1, $2, $3)", creator_id, user_id, who.user_id)
            await record(conn, action="appoint", creator_id=creator_id, in_drop_id=None,
                         user_id=user_id, moderator_id=who.user_id or "")
        row = await conn.fetchrow(
            "SELECT appointed_by, created_at FROM creator_moderators "
            "WHERE creator_id = $1 AND user_id = $2", creator_id, user_id)
    cache = _cache(request)
    if cache is not None:
        cache.invalidate(creator_id)
    return JSONResponse({"user_id": user_id, "appointed_by": row["appointed_by"],
                         "appointed_at": _iso(row["created_at"])},
                        status_code=200 if exists else 201)


async def dismiss(request: Request) -> Response:
    who, creator_id = await _owner(request)
    user_id = _user_id(request.path_params["user_id"], "user_id")
    db = request.app.state.db
    async with db.acquire() as conn, conn.transaction():
        gone = await conn.fetchval(
            "DELETE FROM creator_moderators WHERE creator_id = $1 AND user_id = $2 "
            "RETURNING user_id", creator_id, user_id)
        if gone is None:
            raise NotFound(f"{user_id} is not a moderator of {creator_id}",
                           code="moderator_not_found")
        await record(conn, action="dismiss", creator_id=creator_id, in_drop_id=None,
                     user_id=user_id, moderator_id=who.user_id or "")
    cache = _cache(request)
    if cache is not None:
        cache.invalidate(creator_id)
    return Response(status_code=204)


async def drop_moderation(request: Request) -> JSONResponse:
    """The drop's moderation audit: creator, admins and the creator's moderators."""
    drop_id = request.path_params["drop_id"]
    who = await require(request)
    query = request.query_params
    for name in query:
        if name not in ("limit", "before"):
            raise ValidationFailed(f"{name} is not a known query parameter",
                                   details={"field": name})
    limit = parse_int(query["limit"], "limit", low=1, high=200) if query.get("limit") else 50
    before = (parse_int(query["before"], "before", low=1, high=MAX_ID)
              if query.get("before") else None)
    db = request.app.state.db
    creator_id = await db.fetchval("SELECT creator_id FROM drops WHERE id = $1", drop_id)
    if creator_id is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    if not who.can_manage(creator_id) and not await is_moderator_of(db, creator_id,
                                                                      who.user_id):
        raise Forbidden("only the drop's creator, its moderators and admins read its "
                        "moderation", code="not_drop_owner")
    actions = await audit(db, drop_id, creator_id, limit=limit, before=before)
    return JSONResponse({"actions": actions,
                         "next_before": actions[-1]["id"] if len(actions) == limit else None})


_MODS = "/v1/creators/{creator_id}/moderators"

routes = [
    Route(_MODS, list_moderators, methods=["GET"]),
    Route(_MODS + "/{user_id}", appoint, methods=["PUT"]),
    Route(_MODS + "/{user_id}", dismiss, methods=["DELETE"]),
    Route("/v1/drops/{drop_id:id}/moderation", drop_moderation, methods=["GET"]),
]
