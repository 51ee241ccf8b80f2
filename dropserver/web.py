"""The web pages: the viewer's live page, the creator's console, their assets.

Pages and scripts live in ``web/`` (plain ES modules, no build); ``npm ci && npm run
build`` in ``web/`` copies hls.js from npm into ``web/dist/`` (docs/web.md). Files are
served from the repository's ``web/`` when it is there, else from the copy the wheel
packs as ``dropserver/web``. Only ``css/``, ``js/``, ``img/`` and ``dist/`` are public:
never ``package.json``, ``node_modules`` or the JS tests. ``/favicon.ico`` is
``img/favicon.ico`` (browsers, bookmarks and crawlers ask for it by that name).

This component is mounted last so every API route wins over it.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from checkout import inventory, keys
from dropserver.auth import Role, issue_token, require, require_drop_owner
from dropserver.component import Component
from dropserver.errors import NotFound, ValidationFailed
from realtime.moderators import guard_sales

__all__ = ["component", "web_dir"]

_PUBLIC_DIRS = ("css", "js", "img", "dist")
_DEV_TOKEN_TTL = 12 * 3600
_NAME_RE = re.compile(r"^[\w .'-]{1,40}$")

# Scripts only from this origin and Stripe's (Stripe.js must be loaded from
# js.stripe.com: https://docs.stripe.com/js/including); hls.js feeds Media Source
# from blob: URLs and may start a blob: worker.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self' https://js.stripe.com",
    "frame-src https://js.stripe.com https://hooks.stripe.com",
    "connect-src 'self' ws: wss: https://api.stripe.com",
    "img-src 'self' data: blob: https:",
    "media-src 'self' blob: mediastream:",
    "worker-src 'self' blob:",
    "style-src 'self' 'unsafe-inline'",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])


def web_dir() -> Path:
    """The repository's ``web/`` if present, else the packaged ``dropserver/web``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "web", here / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    return here.parent / "web"


def _page(name: str) -> FileResponse:
    path = web_dir() / name
    if not path.is_file():
        raise NotFound(f"page {name} is not installed", code="page_missing")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers={
        "cache-control": "no-cache",
        "content-security-policy": CONTENT_SECURITY_POLICY,
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
        # the console needs the camera and microphone; the viewer page does not
        "permissions-policy": ("camera=(self), microphone=(self)" if name == "console.html"
                               else "camera=(), microphone=()"),
    })


async def viewer_page(request: Request) -> Response:
    """``/`` and ``/d/{drop_id}``: the live page (the script reads the drop id)."""
    return _page("index.html")


async def console_page(request: Request) -> Response:
    """``/console``: the creator's console."""
    return _page("console.html")


async def web_config(request: Request) -> JSONResponse:
    """What the pages need to know about this server (no secrets)."""
    s = request.app.state.settings
    return JSONResponse({
        "dev": s.dev,
        "ws_path": "/ws",
        # where viewers fetch media: DROPSERVER_PUBLIC_URL (a CDN) or this origin
        "hls_url_template": s.public_url.rstrip("/") + "/v1/drops/{drop_id}/hls/live.m3u8",
        "whip_url_template": "/v1/drops/{drop_id}/whip",
        "payment_gateway": s.payment_gateway,
        "stripe_publishable_key": s.stripe_publishable_key
        if s.payment_gateway == "stripe" else "",
        "reconnect_min_ms": s.reconnect_min_ms,
        "reconnect_max_ms": s.reconnect_max_ms,
        "hold_ttl": s.hold_ttl,
    }, headers={"cache-control": "no-cache"})


async def dev_token(request: Request) -> JSONResponse:
    """Development only: a viewer token for this browser, so buying needs no pasting.

    404 unless the server runs in dev mode; it only ever issues viewer tokens.
    """
    settings = request.app.state.settings
    if not settings.dev:
        raise NotFound("not found", code="not_found")
    role = request.query_params.get("role", Role.VIEWER.value)
    if role != Role.VIEWER.value:
        raise ValidationFailed("only viewer tokens are issued here",
                               details={"field": "role"})
    name = request.query_params.get("name", "")
    if name and not _NAME_RE.match(name):
        raise ValidationFailed("name: 1-40 letters, digits, spaces or .'-",
                               details={"field": "name"})
    user_id = f"viewer-{secrets.token_hex(6)}"
    display = name or f"Viewer {user_id[-4:]}"
    token = issue_token(settings, user_id, Role.VIEWER, ttl=_DEV_TOKEN_TTL, name=display)
    return JSONResponse({"token": token, "user_id": user_id, "role": Role.VIEWER.value,
                         "name": display, "expires_in": _DEV_TOKEN_TTL},
                        headers={"cache-control": "no-store"})


async def console_stats(request: Request) -> JSONResponse:
    """``GET /v1/drops/{id}/stats``: the console's live numbers for the drop's owner.

    ``sold`` and ``revenue`` count paid orders (PostgreSQL, written by the payments
    worker); ``open_holds`` are holds waiting for payment (the hold expiry index in
    Redis, ``checkout.keys.expiry``); ``remaining`` is units left per product
    (``checkout.inventory.remaining``). Viewers come over the socket ("viewers").
    Defined here for the console; a route of the drops package at the same path wins.
    """
    drop_id = request.path_params["drop_id"]
    who = await require(request, Role.CREATOR)
    state = request.app.state
    row = await state.db.fetchrow(
        "SELECT creator_id, state, currency FROM drops WHERE id = $1", drop_id)
    if row is None:
        raise NotFound(f"drop {drop_id} not found", code="drop_not_found")
    require_drop_owner(who, row["creator_id"])
    totals = await state.db.fetchrow(
        "SELECT coalesce(sum(quantity), 0) AS sold, coalesce(sum(amount), 0) AS revenue, "
        "count(*) AS orders FROM orders WHERE drop_id = $1 AND state = 'paid'", drop_id)
    open_holds = await state.redis.zcard(keys.expiry(drop_id))
    remaining = await inventory.remaining(state.redis, drop_id)
    return JSONResponse({
        "drop_id": drop_id,
        "state": row["state"],
        "currency": row["currency"].strip(),
        "sold": int(totals["sold"]),
        "orders": int(totals["orders"]),
        "revenue": int(totals["revenue"]),
        "open_holds": int(open_holds),
        "remaining": {str(k): v for k, v in remaining.items()},
    }, headers={"cache-control": "no-store"})


_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                ".svg": "image/svg+xml", ".ico": "image/x-icon"}


async def static_file(request: Request) -> Response:
    """``/static/{css,js,img,dist}/...``: a file under one of the public folders."""
    rel = request.path_params["path"]  # never a NUL: dropserver.http.NulGuard
    top = rel.split("/", 1)[0]
    root = web_dir()
    if top not in _PUBLIC_DIRS:
        raise NotFound("no such file", code="not_found")
    base = (root / top).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise NotFound("no such file", code="not_found")
    # our own scripts change with the server: revalidate (ETag) every time
    return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix), headers={
        "cache-control": "no-cache", "x-content-type-options": "nosniff"})


async def favicon(request: Request) -> Response:
    """``/favicon.ico``: asked for by every browser that finds no icon link."""
    path = web_dir() / "img" / "favicon.ico"
    if not path.is_file():
        raise NotFound("no such file", code="not_found")
    return FileResponse(path, media_type=_MEDIA_TYPES[".ico"], headers={
        "cache-control": "public, max-age=86400"})


component = Component(
    name="web",
    routes=[
        Route("/", viewer_page, methods=["GET", "HEAD"]),
        Route("/d/{drop_id:id}", viewer_page, methods=["GET", "HEAD"]),
        Route("/console", console_page, methods=["GET", "HEAD"]),
        Route("/v1/web/config", web_config, methods=["GET"]),
        Route("/v1/dev/token", dev_token, methods=["GET"]),
        Route("/v1/drops/{drop_id:id}/stats", guard_sales(console_stats), methods=["GET"]),
        Route("/static/{path:path}", static_file, methods=["GET", "HEAD"]),
        Route("/favicon.ico", favicon, methods=["GET", "HEAD"]),
    ],
)
