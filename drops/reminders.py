"""Reminders: "Remind me" on a scheduled drop, handed to the outbound notification.

* A signed-in viewer asks to be reminded of a scheduled drop
  (``POST /v1/drops/{id}/reminder``; ``DELETE`` takes it back, ``GET`` says whether).
* Two reminders per drop: ``starting_soon`` :data:`LEAD` (10 minutes) before
  ``starts_at`` while the drop is still scheduled, and ``live`` once it went on air.
  Each is handed to the outbound notification as a ``drop.reminder`` event
  (:func:`hand_off`: ``dropserver.outbound.enqueue``, in the claiming transaction; the
  outbound webhooks deliver it to the creator's email, SMS or push tool: the server
  sends no message itself), in batches of :data:`BATCH` users.
* The due time is durable: it is the drop's own ``starts_at`` / ``live_at`` in
  PostgreSQL, so nothing is lost in a restart. Every process runs :class:`Reminders`
  (a scan every :data:`SCAN_SECONDS`, woken at once by a go-live on this process); a
  reminder is claimed by one ``UPDATE drop_reminders SET soon_for = starts_at``
  (``live_for = live_at``) in the transaction that hands it off, so it goes out once
  across every node and process (a second process's UPDATE waits for the first's row
  locks, then finds nothing left to claim). A drop rescheduled after its reminder went
  out has a new ``starts_at``: its users are reminded again for the new time. Someone
  who asks after the reminder went out still gets it at the next scan.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dropserver import outbound
from dropserver.auth import require, require_drop_owner
from dropserver.background import Periodic, stop_task
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import Conflict, NotFound
from dropserver.http import read_json, reject_unknown
from realtime.moderators import guard_sales

__all__ = ["BATCH", "LEAD", "Reminders", "hand_off", "part"]

log = logging.getLogger("dropserver.reminders")

LEAD = "10 minutes"          # the starting_soon reminder, before starts_at
STALE = "1 hour"             # older starts (or go-lives) are not reminded any more
SCAN_SECONDS = 5.0
BATCH = 500                  # users per drop.reminder event
EVENT = outbound.EventType.DROP_REMINDER.value
ON_AIR_STATES = ("live", "selling", "sold_out", "closed")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def hand_off(conn: Any, event_type: str, payload: dict[str, Any],
                   creator_id: str) -> str | None:
    """Give one event to the outbound notification, in the caller's transaction: the
    outbound webhooks' queue (:func:`dropserver.outbound.enqueue`, which the creator's
    and the platform's endpoints hear), and ``drop_reminder_notices`` (the log the
    console reads). Both commit or roll back with the claim. Returns the event id."""
    notice = await conn.fetchval(
        "INSERT INTO drop_reminder_notices (drop_id, kind, starts_at, users, payload) "
        "VALUES ($1, $2, $3::text::timestamptz, $4, $5) RETURNING id",
        payload["drop_id"], payload["kind"], payload["for"], len(payload["users"]),
        payload)
    return await outbound.enqueue(conn, event_type, payload, creator_id=creator_id,
                                  drop_id=payload["drop_id"], key=f"{event_type}:{notice}")


_DUE = {
    "starting_soon": f"""
        SELECT d.id, d.creator_id, d.title, d.starts_at AS due_for FROM drops d
        WHERE d.state = 'scheduled' AND d.starts_at <= now() + interval '{LEAD}'
          AND d.starts_at > now() - interval '{STALE}'
          AND EXISTS (SELECT 1 FROM drop_reminders r WHERE r.drop_id = d.id
                      AND r.soon_for IS DISTINCT FROM d.starts_at)""",
    "live": f"""
        SELECT d.id, d.creator_id, d.title, d.live_at AS due_for FROM drops d
        WHERE d.state = ANY($1::text[]) AND d.live_at > now() - interval '{STALE}'
          AND EXISTS (SELECT 1 FROM drop_reminders r WHERE r.drop_id = d.id
                      AND r.live_for IS DISTINCT FROM d.live_at)""",
}
_CLAIM = {
    "starting_soon": """
        UPDATE drop_reminders r SET soon_for = d.starts_at FROM drops d
        WHERE r.drop_id = $1 AND d.id = r.drop_id AND d.state = 'scheduled'
          AND d.starts_at = $2 AND r.soon_for IS DISTINCT FROM d.starts_at
        RETURNING r.user_id""",
    "live": """
        UPDATE drop_reminders r SET live_for = d.live_at FROM drops d
        WHERE r.drop_id = $1 AND d.id = r.drop_id AND d.live_at = $2
          AND r.live_for IS DISTINCT FROM d.live_at
        RETURNING r.user_id""",
}


class Reminders:
    """The reminder scan the node's chore worker runs (dropserver.chores); the other
    workers scan once when a drop goes live on them (:meth:`wake`)."""

    def __init__(self, app: Any, public_url: str = "") -> None:
        self.app = app
        self.public_url = public_url.rstrip("/")
        self.handed = 0  # events handed off by this process
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None  # a scan of wake() without the loop
        self._scanning = False  # this process runs the scan loop
        self.periodic = Periodic("reminders", 0, self._step, log, "reminder scan")

    def wake(self) -> None:
        """Scan now (a drop went live on this process). A worker that runs no scan
        loop (not its node's chore worker) scans once itself: the "it's live"
        reminders go out now, not at the chore worker's next scan (a claim is one
        transaction: two scans at once hand nothing off twice)."""
        if self._scanning:
            self._wake.set()
        elif self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._scan_once(),
                                                                name="reminders-now")

    async def _scan_once(self) -> None:
        try:
            await self.scan()
        except Exception:
            log.warning("reminder scan failed", exc_info=True)

    async def _step(self) -> None:
        try:
            await self.scan()
        finally:  # a failed scan (PostgreSQL away) waits too: no busy loop
            try:
                await asyncio.wait_for(self._wake.wait(), SCAN_SECONDS)
            except TimeoutError:
                pass
            self._wake.clear()

    async def scan(self) -> int:
        """Hand off every due reminder; the number of events handed off."""
        db = self.app.state.db
        handed = 0
        for kind, sql in _DUE.items():
            args = [list(ON_AIR_STATES)] if kind == "live" else []
            for drop in await db.fetch(sql, *args):
                handed += await self._send(db, kind, drop)
        self.handed += handed
        return handed

    async def _send(self, db: Any, kind: str, drop: Any) -> int:
        async with db.acquire() as conn, conn.transaction():
            users = [r["user_id"] for r in await conn.fetch(
                _CLAIM[kind], drop["id"], drop["due_for"])]
            if not users:
                return 0  # another process claimed them, or the drop moved on
            names = {r["id"]: r["display_name"] for r in await conn.fetch(
                "SELECT id, display_name FROM users WHERE id = ANY($1::text[])", users)}
            users.sort()
            batches = [users[i:i + BATCH] for i in range(0, len(users), BATCH)]
            row = await conn.fetchrow("SELECT starts_at, live_at FROM drops WHERE id = $1",
                                      drop["id"])
            for n, batch in enumerate(batches, 1):
                payload = {
                    "drop_id": drop["id"], "kind": kind, "title": drop["title"],
                    "for": _iso(drop["due_for"]), "starts_at": _iso(row["starts_at"]),
                    "live_at": _iso(row["live_at"]),
                    "url": f"{self.public_url}/d/{drop['id']}",
                    "batch": n, "batches": len(batches),
                    "users": [{"user_id": u, "name": names.get(u) or u} for u in batch],
                }
                await hand_off(conn, EVENT, payload, drop["creator_id"])
            log.info("reminders handed off", extra={"drop_id": drop["id"], "kind": kind,
                                                    "users": len(users)})
            return len(batches)

    def start(self) -> None:
        self._scanning = True
        self.periodic.start()

    async def stop(self) -> None:
        await self.periodic.stop()
        if self._task is not None:
            await stop_task(self._task, log)


# -- HTTP -------------------------------------------------------------------------------

async def _visible_drop(request: Request) -> Any:
    drop_id = request.path_params["drop_id"]
    row = await request.app.state.db.fetchrow(
        "SELECT id, creator_id, state FROM drops WHERE id = $1", drop_id)
    if row is None or row["state"] == "draft":
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    return row


async def get_reminder(request: Request) -> JSONResponse:
    who = await require(request)
    drop = await _visible_drop(request)
    reminded = await request.app.state.db.fetchval(
        "SELECT 1 FROM drop_reminders WHERE drop_id = $1 AND user_id = $2",
        drop["id"], who.user_id)
    return JSONResponse({"drop_id": drop["id"], "reminded": bool(reminded)})


async def remind_me(request: Request) -> JSONResponse:
    who = await require(request)
    reject_unknown(await read_json(request), ())
    drop = await _visible_drop(request)
    if drop["state"] != "scheduled":
        raise Conflict(f"drop {drop['id']} is {drop['state']}: reminders are for "
                       "scheduled drops", code="drop_not_scheduled",
                       details={"state": drop["state"]})
    db = request.app.state.db
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO users (id, display_name) VALUES ($1, $2) "
                           "ON CONFLICT (id) DO NOTHING", who.user_id, who.name or "")
        new = await conn.fetchval(
            "INSERT INTO drop_reminders (drop_id, user_id) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING 1", drop["id"], who.user_id)
    return JSONResponse({"drop_id": drop["id"], "reminded": True},
                        status_code=201 if new else 200)


async def forget_me(request: Request) -> Response:
    who = await require(request)
    drop = await _visible_drop(request)
    await request.app.state.db.execute(
        "DELETE FROM drop_reminders WHERE drop_id = $1 AND user_id = $2",
        drop["id"], who.user_id)
    return Response(status_code=204)


async def list_reminders(request: Request) -> JSONResponse:
    """How many asked, and what was handed off (the drop's creator and admins)."""
    who = await require(request)
    drop_id = request.path_params["drop_id"]
    db = request.app.state.db
    creator_id = await db.fetchval("SELECT creator_id FROM drops WHERE id = $1", drop_id)
    if creator_id is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    require_drop_owner(who, creator_id)
    count = await db.fetchval("SELECT count(*) FROM drop_reminders WHERE drop_id = $1",
                              drop_id)
    rows = await db.fetch(
        "SELECT kind, starts_at, users, sent_at FROM drop_reminder_notices "
        "WHERE drop_id = $1 ORDER BY id", drop_id)
    return JSONResponse({"drop_id": drop_id, "reminded": count, "sent": [
        {"kind": r["kind"], "for": _iso(r["starts_at"]), "users": r["users"],
         "at": _iso(r["sent_at"])} for r in rows]})


async def startup(app: Starlette) -> None:
    reminders = Reminders(app, app.state.settings.public_url)
    app.state.reminders = reminders
    if chores(app):  # one scan loop per node (dropserver.chores)
        reminders.start()


async def shutdown(app: Starlette) -> None:
    reminders: Reminders | None = getattr(app.state, "reminders", None)
    if reminders is not None:
        await reminders.stop()


_R = "/v1/drops/{drop_id:id}/reminder"

part = Component(
    name="drops.reminders",
    routes=[
        Route(_R, get_reminder, methods=["GET"]),
        Route(_R, remind_me, methods=["POST"]),
        Route(_R, forget_me, methods=["DELETE"]),
        Route("/v1/drops/{drop_id:id}/reminders", guard_sales(list_reminders),
              methods=["GET"]),
    ],
    startup=startup,
    shutdown=shutdown,
)
