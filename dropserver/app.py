"""The application: shared connections plus the routes of every domain package.

Follow the imports from here to find any endpoint: ``realtime.component`` (the
WebSocket gateway), ``drops.component`` (creator API), ``checkout.component``
(buy, payments, webhooks), ``streaming.component`` (WHIP, HLS, replays) and, last so
API routes win, ``dropserver.web`` (the viewer page and the creator console).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import checkout.component
import drops.component
import realtime.component
import streaming.component
from dropserver import __version__, openapi, outbound_api, web
from dropserver.auth import TokenVerifier, principal, require
from dropserver.background import Periodic
from dropserver.chores import runs_chores
from dropserver.component import Component
from dropserver.db import create_pool
from dropserver.errors import ValidationFailed, exception_handlers
from dropserver.http import NulGuard, read_json, reject_unknown
from dropserver.observability import (
    RequestContextMiddleware,
    bind,
    flush_tallies,
    metrics_endpoint,
)
from dropserver.redis_client import connect as connect_redis
from dropserver.redis_client import ready as redis_ready
from dropserver.settings import Settings
from realtime import moderators

__all__ = ["COMPONENTS", "create_app"]

log = logging.getLogger("dropserver.app")

COMPONENTS: tuple[Component, ...] = (
    realtime.component.component,
    drops.component.component,
    checkout.component.component,
    streaming.component.component,
    outbound_api.component,  # outbound webhooks: endpoints, delivery log, dispatcher
    web.component,  # pages and static files: last, so API routes win
)


async def _flush_tallies() -> None:
    flush_tallies()


async def healthz(request: Request) -> JSONResponse:
    """The process is up and its event loop answers."""
    return JSONResponse({"status": "ok", "node": request.app.state.node_id,
                         "version": __version__})


READY_PROBE_S = 1.0  # a dependency's probe answers within this, or it is slow
# A probe that is merely slow (no error) still counts as ready while the dependency
# answered one within this many seconds (a slow probe goes on in the background, for
# at most as long, and its answer counts when it comes): a node busy with a join storm
# and a rush answers late, and a load balancer that took every busy node out at once
# would turn the loss of one node into an outage of all of them. An error (refused,
# reset, an error reply) is unready at once.
READY_SLOW_GRACE_S = 5.0


async def _probe(name: str, probe, answered: dict[str, float]) -> None:
    async with asyncio.timeout(READY_SLOW_GRACE_S):
        await probe()
    answered[name] = asyncio.get_running_loop().time()


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # a late probe's failure: the next /readyz sees its own


async def readyz(request: Request) -> JSONResponse:
    """Redis and PostgreSQL answer (within a second, or slower but answered within the
    last few seconds), and the worker is not draining."""
    state = request.app.state
    checks: dict[str, str] = {}
    answered: dict[str, float] | None = getattr(state, "ready_answered", None)
    if answered is None:  # dependency -> when it last answered a probe
        answered = state.ready_answered = {}

    async def check(name: str, probe) -> None:
        task = asyncio.ensure_future(_probe(name, probe, answered))
        await asyncio.wait([task], timeout=READY_PROBE_S)
        if not task.done():  # slow: it goes on and counts when it answers
            task.add_done_callback(_retrieved)
            if asyncio.get_running_loop().time() - answered.get(name, -math.inf) \
                    < READY_SLOW_GRACE_S:
                checks[name] = "slow"
            else:
                checks[name] = f"TimeoutError: no answer in {READY_PROBE_S:g} s"
        elif task.exception() is not None:  # any failure means not ready
            exc = task.exception()
            checks[name] = f"{type(exc).__name__}: {exc}"[:200]
        else:
            checks[name] = "ok"

    await asyncio.gather(
        check("redis", state.redis.ping),
        check("postgres", lambda: state.db.fetchval("SELECT 1")),
    )
    draining = getattr(state, "draining", False)
    ready = all(v in ("ok", "slow") for v in checks.values()) and not draining
    body = {"status": "ready" if ready else "unavailable", "checks": checks,
            "draining": draining}
    if not ready:
        body["error"] = {"code": "unavailable", "message": "not ready", "details": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


async def me(request: Request) -> JSONResponse:
    """Who the bearer token says the caller is (guests get ``guest: true``)."""
    who = await principal(request)
    if who.is_guest:
        return JSONResponse({"guest": True, "user_id": None, "role": None})
    db = request.app.state.db
    avatar = await db.fetchval("SELECT avatar_url FROM users WHERE id = $1", who.user_id)
    return JSONResponse({"guest": False, "user_id": who.user_id,
                         "role": who.role.value if who.role else None, "name": who.name,
                         "avatar_url": avatar or "",
                         "moderator_of": await moderators.moderator_of(db, who.user_id)})


async def update_me(request: Request) -> JSONResponse:
    """The caller's profile as pages show it: ``display_name``, ``avatar_url``."""
    who = await require(request)
    data = await read_json(request)
    reject_unknown(data, ("display_name", "avatar_url"))
    if not data:
        raise ValidationFailed("send display_name or avatar_url", details={"field": "body"})
    # A field sent must be a string (null is refused like any wrong type: empty
    # removes the avatar); a field left out keeps its value.
    name = data.get("display_name")
    if "display_name" in data and (not isinstance(name, str) or len(name) > 80
                                   or not name.strip()):
        raise ValidationFailed("display_name must be 1 to 80 characters",
                               details={"field": "display_name"})
    avatar = data.get("avatar_url")
    if "avatar_url" in data and (not isinstance(avatar, str) or len(avatar) > 2000 or (
            avatar and not avatar.startswith(("https://", "http://", "/")))):
        raise ValidationFailed("avatar_url must be an http(s) URL or a path, at most 2000 "
                               "characters (empty removes it)", details={"field": "avatar_url"})
    row = await request.app.state.db.fetchrow(
        "INSERT INTO users (id, display_name, avatar_url) "
        "VALUES ($1, coalesce($2, ''), coalesce($3, '')) ON CONFLICT (id) DO UPDATE SET "
        "display_name = coalesce($2, users.display_name), "
        "avatar_url = coalesce($3, users.avatar_url) RETURNING display_name, avatar_url",
        who.user_id, name.strip() if name is not None else None, avatar)
    return JSONResponse({"user_id": who.user_id, "display_name": row["display_name"],
                         "avatar_url": row["avatar_url"]})


DEV_PREFIX = "/v1/dev/"


def _mounted(route: object, settings: Settings) -> bool:
    """Routes under ``/v1/dev/`` (the fake gateway's confirm, dev tokens) exist only under
    ``dropserver dev`` or with ``DROPSERVER_UNSAFE_FAKE_PAYMENTS=1``; each handler still
    checks its own condition (``/v1/dev/token`` answers only in dev mode)."""
    path = getattr(route, "path", "")
    return settings.fake_payments_allowed or not path.startswith(DEV_PREFIX)


async def openapi_json(request: Request) -> JSONResponse:
    """``GET /openapi.json``: the OpenAPI 3.1 document of the routes this app mounts."""
    state = request.app.state
    doc = getattr(state, "openapi", None)
    if doc is None:
        doc = state.openapi = openapi.document(request.app.routes)
    return JSONResponse(doc)


async def _close_pool(pool: asyncpg.Pool, within: float = 5.0) -> None:
    """Close ``pool`` gracefully (each connection released first), or, when a
    connection is still held ``within`` seconds later (a task that did not stop),
    terminate it: shutdown never waits on one query."""
    try:
        await asyncio.wait_for(pool.close(), within)
    except TimeoutError:
        log.warning("database pool did not close; terminated", extra={"within_s": within})
        pool.terminate()


def create_app(settings: Settings, components: tuple[Component, ...] = COMPONENTS) -> Starlette:
    if not settings.redis_url or not settings.database_url:
        raise ValueError("create_app needs settings.redis_url and settings.database_url")
    # However the settings were built (``replace`` does not validate): an unsafe
    # combination, such as the fake gateway outside dev, never starts.
    settings.validate()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        state.node_id = settings.effective_node_id
        state.draining = False
        # Worker 0 of a node (or a process that is the whole node) runs the node's
        # chores; the other workers only their own process's loops (dropserver.chores).
        state.chores = runs_chores()
        state.verifier = TokenVerifier(settings)
        # WebSocket commands other packages handle (e.g. checkout registers "buy"):
        # name -> async handler(app, conn: realtime.CommandContext, data: dict) -> dict
        state.commands = {}
        bind(node_id=state.node_id)
        state.redis = connect_redis(
            settings.redis_url, decode_responses=False, health_check_interval=15,
            socket_keepalive=True, max_connections=512,
        )
        await redis_ready(state.redis)
        state.db = await create_pool(settings.database_url, min_size=settings.db_pool_min,
                                     max_size=settings.db_pool_max)
        # The creator's lifecycle actions never queue behind the order workers, which
        # can hold every connection of ``db`` while a sell-out drains (drops.actions).
        state.db_control = await create_pool(settings.database_url, min_size=1,
                                             max_size=settings.db_control_pool)
        started: list[Component] = []
        tallies = Periodic("metrics-tallies", 1.0, _flush_tallies, log, "metrics flush")
        tallies.start()
        try:
            for comp in components:
                if comp.startup is not None:
                    await comp.startup(app)
                started.append(comp)
            log.info("started", extra={"components": [c.name for c in components]})
            yield
        finally:
            for comp in reversed(started):
                if comp.shutdown is not None:
                    try:
                        await comp.shutdown(app)
                    except Exception:
                        log.exception("shutdown hook failed", extra={"component": comp.name})
            for pool in (state.db, state.db_control):
                await _close_pool(pool)
            await state.redis.aclose()
            await tallies.stop()
            flush_tallies()

    async def drain() -> None:
        """Stop taking new work; each component tells its clients when to retry."""
        app.state.draining = True
        for comp in components:
            if comp.drain is not None:
                try:
                    await comp.drain(app)
                except Exception:
                    log.exception("drain hook failed", extra={"component": comp.name})

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/me", me, methods=["GET"]),
        Route("/v1/me", update_me, methods=["PATCH"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    for comp in components:
        routes.extend(r for r in comp.routes if _mounted(r, settings))
    middleware = [Middleware(RequestContextMiddleware), Middleware(NulGuard)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["authorization", "content-type", "idempotency-key"],
            expose_headers=["location", "link", "etag"],
        ))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers=exception_handlers())
    app.state.drain = drain
    app.state.settings = settings
    return app
