"""Giveaways over HTTP and WebSocket, the live entry count and the closer.

* Creator: ``POST /v1/drops/{id}/giveaways`` opens one (a product of the drop or a
  prize described in text, the entry window, the number of winners, eligibility).
* Anyone: ``GET /v1/drops/{id}/giveaways[/{gid}]``, and after the draw
  ``GET .../{gid}/entrants`` (the sorted tickets the draw shuffled).
* Viewers: the WebSocket command ``giveaway.enter`` {giveaway_id} from a socket joined
  to the drop, or ``POST /v1/drops/{id}/giveaways/{gid}/entries``.
* The node's chore worker (dropserver.chores): the closer (draw and announce, once per
  giveaway across processes), asleep until the next giveaway's close (at most
  ``CLOSER_IDLE_S``; an open on its own process wakes it). Every process: the
  coalesced ``giveaway.entries`` count (volatile, at most one per
  ``DROPSERVER_STOCK_COALESCE_MS`` per process and giveaway) and the entrant journal.

Present (a giveaway's ``must_be_present``, the default): the entry comes from a
signed-in socket joined to the drop that is not its creator's or an admin's (the
socket is open at entry time by construction), or, over HTTP, this process holds
such a socket of the caller's (``not_present`` otherwise: behind a balancer, enter
from the socket). The design and the draw: docs/topics/giveaways.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
from prometheus_client import Counter
from redis.exceptions import NoScriptError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import keys as checkout_keys
from checkout.redis_pipe import NotReplicated
from drops import giveaway, giveaway_store, store
from drops.giveaway import GiveawayState, Refusal
from drops.giveaway_store import GiveawayRefused, Meta
from drops.lifecycle import ON_AIR, DropState
from dropserver.auth import Principal, Role, principal, require, require_drop_owner
from dropserver.background import Scheduled, stop_task
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError, Conflict, NotFound, Unauthorized, ValidationFailed
from dropserver.http import field, read_json, reject_unknown
from dropserver.observability import bind, tally, tally_label
from dropserver.redis_client import is_cluster
from realtime.moderators import guard_sales
from realtime.publish import publish, publish_user, publish_volatile

__all__ = ["Giveaways", "enter", "giveaway_json", "open_giveaway", "part"]

log = logging.getLogger("dropserver.giveaways")

ENTRIES = Counter("dropserver_giveaway_entries_total",
                  "Giveaway entry attempts by outcome (new, repeat or the refusal code)",
                  ["result"])
_NEW, _REPEAT = ENTRIES.labels("new"), ENTRIES.labels("repeat")

OPEN_FIELDS = ("product_id", "prize", "winners", "duration_s", "must_be_present",
               "must_have_bought")
MIN_WINDOW_S, MAX_WINDOW_S = 2, 3600
# How late a draw may be: the closer's next round after a close that did not draw
# (Redis' clock not there yet, another process drawing, a failure) or announce. The
# round at the close itself is timed to it.
CLOSER_INTERVAL_S = 0.2
# The longest the closer sleeps: a giveaway opened on another process is seen within
# this, before it can close (a window is at least MIN_WINDOW_S). It was five
# PostgreSQL queries a second per worker whatever was due.
CLOSER_IDLE_S = 1.0
CLOSE_MARGIN_S = 0.005  # after the close: Redis' clock, which judges it, a hair behind
JOURNAL_MAX = 200_000  # entrants kept while PostgreSQL is away (then the oldest go)
JOURNAL_BATCH = 5_000


def giveaway_json(row: dict[str, Any], *, entries: int | None = None,
                  won: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The API's view of a giveaway (the seed only once drawn)."""
    drawn = row["state"] == GiveawayState.DRAWN
    out: dict[str, Any] = {
        "id": row["id"], "drop_id": row["drop_id"], "state": row["state"],
        "prize": row["prize"], "product_id": row["product_id"], "winners": row["winners"],
        "must_be_present": row["must_be_present"],
        "must_have_bought": row["must_have_bought"], "commitment": row["commitment"],
        # unix ms by Redis' clock, as the events (and a hold's expires_at) say them
        "opened_at": row["opened_at_ms"], "closes_at": row["closes_at_ms"],
        "entries": row["entrants"] if drawn else entries,
        "seed": row["seed"] if drawn else None,
        "drawn_at": row["drawn_at_ms"],
        "results": None,
    }
    if drawn and won is not None:
        out["results"] = [{"rank": w["rank"], "ticket": w["ticket"],
                           "name": w["display_name"]} for w in won]
        out["entrants_url"] = (f"/v1/drops/{row['drop_id']}/giveaways/{row['id']}"
                               "/entrants")
    return out


class Giveaways:
    """This process's giveaway machinery, kept on ``app.state.giveaways``."""

    def __init__(self, app: Starlette) -> None:
        s = app.state.settings
        self.app = app
        self.redis = app.state.redis
        self.db: asyncpg.Pool = app.state.db
        self.meta: dict[int, Meta] = {}
        self._meta_loading: dict[tuple[int, int], asyncio.Future[Meta]] = {}
        self._dirty: dict[int, int] = {}  # giveaway id -> drop id
        self._journal: list[tuple[Meta, str, str]] = []  # new entrants to write
        self._restoring: dict[int, asyncio.Lock] = {}
        self._cluster = is_cluster(self.redis)
        self._wake = asyncio.Event()
        self._lagging = 0  # closer rounds in a row a replica lagged (logged now and then)
        self.coalesce = max(s.stock_coalesce_ms, 1) / 1000
        self._counts: asyncio.Task | None = None
        self.closer = Scheduled("giveaway-closer", self.close_due, log, "giveaway closer",
                                max_wait=CLOSER_IDLE_S, retry=CLOSER_INTERVAL_S)

    # -- entries ----------------------------------------------------------------------
    async def meta_of(self, drop_id: int, giveaway_id: int) -> Meta:
        """The giveaway's fixed facts, read from PostgreSQL once per process: the
        entries that arrive together when it opens (thousands in its first second)
        share one read instead of each making its own."""
        m = self.meta.get(giveaway_id)
        if m is None:
            key = (drop_id, giveaway_id)
            loading = self._meta_loading.get(key)
            if loading is None:
                loading = self._meta_loading[key] = asyncio.ensure_future(
                    self._load_meta(drop_id, giveaway_id))
                loading.add_done_callback(lambda f: self._loaded(key, f))
            # Shielded: one waiter's cancellation (its socket closed) is not the others'.
            m = await asyncio.shield(loading)
        if m.drop_id != drop_id:
            raise GiveawayRefused(Refusal.NOT_FOUND, "no such giveaway in this drop")
        return m

    def _loaded(self, key: tuple[int, int], f: asyncio.Future[Meta]) -> None:
        self._meta_loading.pop(key, None)
        if not f.cancelled():
            f.exception()  # retrieved: every waiter may have gone (it raised to them)

    async def _load_meta(self, drop_id: int, giveaway_id: int) -> Meta:
        row = await giveaway_store.load_giveaway(self.db, drop_id, giveaway_id)
        if row is None:
            raise GiveawayRefused(Refusal.NOT_FOUND, "no such giveaway in this drop")
        m = Meta(row["id"], row["drop_id"], row["creator_id"], row["product_id"],
                 row["must_be_present"], row["must_have_bought"], bytes.fromhex(row["seed"]))
        self.meta[giveaway_id] = m
        return m

    async def call_enter(self, key_list: list[str], args: list[Any]) -> Any:
        """``giveaway_enter.lua`` on the buy path's auto-pipelined connection."""
        return await self.call_script(giveaway_store._enter, key_list, args)

    async def call_script(self, lua: Any, key_list: list[str], args: list[Any]) -> Any:
        """A script (a ClusterAwareScript or redis-py's AsyncScript) on the buy path's
        auto-pipelined connection: with ``DROPSERVER_HOLD_REPLICAS`` its reply comes
        only once a replica has its writes and everything its primary had before them
        (``WAIT``), :class:`~checkout.redis_pipe.NotReplicated` otherwise. Entries,
        the close and the prizes go this way (docs/topics/giveaways.md, "In a Redis
        failover")."""
        res = getattr(self.app.state, "reservations", None)
        if res is None:
            return await lua(keys=key_list, args=args, client=self.redis)
        script = getattr(lua, "sharded" if self._cluster else "single", lua)
        pipe = res.batcher.pipe
        try:
            return await pipe.execute("EVALSHA", script.sha, len(key_list), *key_list, *args)
        except NoScriptError:
            await pipe.execute("SCRIPT", "LOAD", script.script)
        return await pipe.execute("EVALSHA", script.sha, len(key_list), *key_list, *args)

    async def bought(self, drop_id: int, user_id: str) -> bool:
        """Whether the user holds or paid a unit of any product of the drop."""
        pids = await self.redis.smembers(checkout_keys.products(drop_id))
        async with self.redis.pipeline(transaction=False) as pipe:
            for pid in pids:
                pipe.hexists(checkout_keys.units(drop_id, int(pid)), user_id)
            return any(await pipe.execute())

    def entered(self, m: Meta, user_id: str, name: str) -> None:
        """A new entrant: counted (coalesced) and journaled. No await: the hot path."""
        self._dirty[m.giveaway_id] = m.drop_id
        self._journal.append((m, user_id, name))
        if len(self._journal) > JOURNAL_MAX:
            del self._journal[:len(self._journal) - JOURNAL_MAX]
        self._wake.set()

    async def flush_journal(self) -> None:
        """Write the journaled entrants (tickets computed here, off the hot path); on
        failure they stay queued."""
        while self._journal:
            batch = self._journal[:JOURNAL_BATCH]
            await giveaway_store.journal_entrants(self.db, [
                (m.giveaway_id, user, giveaway.ticket(m.seed, user), name)
                for m, user, name in batch])
            del self._journal[:len(batch)]

    async def restore(self, m: Meta) -> str | None:
        """Redis does not know a giveaway PostgreSQL has: put it back if it is open
        (one per process at a time per giveaway; the others wait for it); returns
        PostgreSQL's state."""
        lock = self._restoring.setdefault(m.giveaway_id, asyncio.Lock())
        async with lock:
            return await giveaway_store.restore_in_redis(self.db, self.redis, m.drop_id,
                                                         m.giveaway_id)

    async def flush_counts(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for giveaway_id, drop_id in dirty.items():
            try:
                count = await giveaway_store.entries(self.redis, drop_id, giveaway_id)
                await publish_volatile(self.redis, drop_id, "giveaway.entries",
                                       {"giveaway_id": giveaway_id, "entries": count})
            except BaseException:
                self._dirty.setdefault(giveaway_id, drop_id)  # said on the next round
                raise

    async def _run_counts(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            for step, what in ((self.flush_journal, "giveaway entry journal"),
                               (self.flush_counts, "giveaway entry counts")):
                try:
                    await step()
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception:  # an outage: retried every round, logged now and then
                    if failures % 50 == 0:
                        log.warning("%s failed; retrying", what, exc_info=True)
                    failures += 1
                    self._wake.set()
            await asyncio.sleep(self.coalesce)

    # -- the closer -------------------------------------------------------------------
    async def close_due(self) -> float | None:
        """Draw and announce what is due (one process draws each giveaway); the seconds
        until the next close (``CLOSER_INTERVAL_S`` while one due is not yet drawn and
        announced; None when none is open)."""
        now = int(time.time() * 1000)
        next_ms = None
        due = False
        for giveaway_id, _drop_id, state, closes_at in await giveaway_store.pending(
                self.db):
            if state == GiveawayState.OPEN and closes_at > now:
                next_ms = closes_at if next_ms is None else min(next_ms, closes_at)
                continue
            due = True  # looked at again next round until it is announced
            try:
                if state == GiveawayState.OPEN:
                    await giveaway_store.close_and_draw(self.db, self.redis, giveaway_id,
                                                        call=self.call_script)
                await self.announce(giveaway_id)
            except NotReplicated as exc:  # a lagging replica: waited out, next round
                self._lagging += 1
                if self._lagging % 25 == 1:
                    log.warning("giveaway draw waits for the replicas", extra={
                        "giveaway_id": giveaway_id, "attempt": self._lagging,
                        "error": str(exc)[:300]})
                continue
            self._lagging = 0
        if due:
            return CLOSER_INTERVAL_S
        if next_ms is None:
            return None
        return (next_ms - time.time() * 1000) / 1000 + CLOSE_MARGIN_S

    async def announce(self, giveaway_id: int) -> bool:
        return await giveaway_store.announce(
            self.db, self.redis, giveaway_id, publish=self._publish, tell=self._tell,
            on_award=self._on_award, load_drop=self._load_drop, call=self.call_script)

    async def _publish(self, drop_id: int, event: str, data: dict) -> None:
        await publish(self.redis, drop_id, event, data)

    async def _tell(self, user_id: str, event: str, data: dict) -> None:
        await publish_user(self.redis, user_id, event, data)

    async def _on_award(self, drop_id: int, product_id: int, award: Any) -> None:
        res = getattr(self.app.state, "reservations", None)
        if res is None:
            return
        res.notifier.stock_changed(drop_id)
        if award.remaining == 0:
            res.notifier.sold_out(drop_id, product_id)

    async def _load_drop(self, drop_id: int) -> str:
        from checkout import recovery

        s = self.app.state.settings
        return await recovery.ensure_loaded(self.db, self.redis, drop_id,
                                            grace_ms=s.recovery_grace_ms, wait=3.0)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._counts = asyncio.get_running_loop().create_task(self._run_counts(),
                                                              name="giveaway-counts")
        if chores(self.app):  # one closer per node (dropserver.chores)
            self.closer.start()

    async def stop(self) -> None:
        await self.closer.stop()
        if self._counts is not None:
            await stop_task(self._counts, log)
        with contextlib.suppress(Exception):
            await self.flush_journal()
        with contextlib.suppress(Exception):
            await self.flush_counts()


class RecentWins:
    """The hub's source of ``giveaway.won`` events a socket missed (realtime.private):
    a user's channel keeps no history, so after a lost subscription the winner's
    sockets are sent their wins announced since they opened, once each."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def key(self, event: str, data: dict[str, Any]) -> tuple[str, int] | None:
        gid = data.get("giveaway_id")
        if event != "giveaway.won" or not isinstance(gid, int):
            return None
        return f"giveaway:{gid}", 0

    async def current(self, user_ids: Any, since: float) -> list[Any]:
        from realtime.private import Current

        return [Current(user, "giveaway.won", data, at)
                for user, data, at in await giveaway_store.recent_wins(
                    self.db, list(user_ids), since)]


def _state(app: Any) -> Giveaways:
    return app.state.giveaways


# -- open -------------------------------------------------------------------------------

async def open_giveaway(app: Any, who: Principal, drop_id: int,
                        data: dict[str, Any]) -> dict[str, Any]:
    """Open a giveaway (validated ``data``, see :data:`OPEN_FIELDS`); publishes
    ``giveaway.opened``. 409 ``giveaway_open`` while another is open in the drop."""
    reject_unknown(data, OPEN_FIELDS)
    product_id = field(data, "product_id", int, default=None, min_value=1)
    prize = field(data, "prize", str, default=None, max_len=200)
    winners = field(data, "winners", int, default=1, min_value=1, max_value=100)
    duration = field(data, "duration_s", int, default=60, min_value=MIN_WINDOW_S,
                     max_value=MAX_WINDOW_S)
    present = field(data, "must_be_present", bool, default=True)
    bought = field(data, "must_have_bought", bool, default=False)
    if prize is not None:
        prize = prize.strip()
        if not prize:
            raise ValidationFailed("prize must not be blank", details={"field": "prize"})
    if product_id is None and prize is None:
        raise ValidationFailed("a giveaway needs a product_id or a prize",
                               details={"field": "product_id"})
    state = app.state
    redis = state.redis
    drop = await store.load_drop(state.db_control, drop_id)
    if drop is None:
        raise NotFound(f"drop {drop_id} does not exist", code="drop_not_found")
    require_drop_owner(who, drop["creator_id"])
    if DropState(drop["state"]) not in ON_AIR:
        raise Conflict(f"the drop is {drop['state']}: giveaways run while it is on air",
                       code="drop_not_on_air", details={"state": drop["state"]})
    if product_id is not None:
        product = next((p for p in drop["products"] if p["product_id"] == product_id), None)
        if product is None:
            raise ValidationFailed(f"product_id {product_id} is not a product of this drop",
                                   details={"field": "product_id"})
        prize = prize or product["title"]
    seed = giveaway.new_seed()
    opened = await giveaway_store.redis_now_ms(redis)
    closes = opened + duration * 1000
    async with state.db_control.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO giveaways (drop_id, creator_id, product_id, prize, winners,
                       must_be_present, must_have_bought, commitment, seed, opened_at_ms,
                       closes_at_ms)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                   RETURNING {giveaway_store.COLUMNS}""",
                drop_id, drop["creator_id"], product_id, prize, winners, present, bought,
                giveaway.commitment(seed), seed.hex(), opened, closes)
        except asyncpg.UniqueViolationError:
            raise Conflict("another giveaway is open in this drop", code="giveaway_open",
                           ) from None
        row = dict(row)
        await giveaway_store.open_in_redis(redis, row)
        body = giveaway_json(row, entries=0)
        await publish(redis, drop_id, "giveaway.opened", {
            **{k: body[k] for k in ("prize", "product_id", "winners", "must_be_present",
                                    "must_have_bought", "commitment", "opened_at",
                                    "closes_at")},
            "giveaway_id": row["id"], "server_time": opened})
    log.info("giveaway opened", extra={"drop_id": drop_id, "giveaway_id": row["id"],
                                       "winners": winners, "duration_s": duration})
    _state(app).closer.wake()  # this process's closer (if it runs here) sleeps to its close
    return body


# -- enter ------------------------------------------------------------------------------

async def enter(app: Any, who: Principal, drop_id: int, giveaway_id: int, *,
                present: bool) -> dict[str, Any]:
    """One entry (the ``giveaway.enter`` command and the HTTP route share it).
    ``present``: the caller has a socket joined to the drop (see the module doc)."""
    if who.is_guest:
        raise Unauthorized("sign in to enter", code="token_missing")
    gw = _state(app)
    try:
        m = await gw.meta_of(drop_id, giveaway_id)
        if who.can_manage(m.creator_id) or who.role is Role.ADMIN:
            raise GiveawayRefused(Refusal.NOT_ELIGIBLE,
                                  "the drop's creator and admins cannot enter")
        if m.must_be_present and not present:
            raise GiveawayRefused(Refusal.NOT_PRESENT, "only viewers present in the room "
                                  "may enter: enter from a socket joined to the drop")
        if m.must_have_bought and not await gw.bought(drop_id, who.user_id or ""):
            raise GiveawayRefused(Refusal.NOT_BOUGHT,
                                  "only buyers of this drop may enter this giveaway")
        user, name = who.user_id or "", who.name or ""
        try:
            new, count = await giveaway_store.try_enter(gw.call_enter, drop_id,
                                                        giveaway_id, user, name)
        except GiveawayRefused as exc:
            # PostgreSQL has it (meta_of) and Redis does not: Redis restarted empty.
            if exc.refusal is not Refusal.NOT_FOUND:
                raise
            state = await gw.restore(m)
            if state == GiveawayState.DRAWN:
                raise GiveawayRefused(Refusal.CLOSED, "the giveaway is drawn") from None
            if state != GiveawayState.OPEN:
                raise
            new, count = await giveaway_store.try_enter(gw.call_enter, drop_id,
                                                        giveaway_id, user, name)
    except ApiError as exc:
        tally_label(ENTRIES, exc.code)
        raise
    tally(_NEW if new else _REPEAT)
    if new:
        gw.entered(m, user, name)
    return {"giveaway_id": giveaway_id, "entered": True, "new": new, "entries": count}


def _giveaway_id(data: dict[str, Any]) -> int:
    return field(data, "giveaway_id", int, min_value=1)


async def ws_enter(app: Any, ctx: Any, data: dict) -> dict:
    """``giveaway.enter`` {giveaway_id}: from a socket joined to the drop (present)."""
    reject_unknown(data, ("giveaway_id",))
    return await enter(app, ctx.principal, int(ctx.drop_id), _giveaway_id(data),
                       present=True)


def _present_here(app: Any, user_id: str, drop_id: int) -> bool:
    """This process holds a socket of ``user_id`` joined to ``drop_id`` as a viewer."""
    hub = getattr(app.state, "realtime", None)
    if hub is None:
        return False
    room = hub.rooms.get(drop_id)
    return any(c.drop_id == drop_id and (room is None or c not in room.staff)
               for c in hub.users.get(user_id, ()))


# -- HTTP -------------------------------------------------------------------------------

def _ids(request: Request) -> tuple[int, int]:
    drop_id = request.path_params["drop_id"]
    giveaway_id = request.path_params["giveaway_id"]
    bind(drop_id=drop_id)
    return drop_id, giveaway_id


async def http_open(request: Request) -> JSONResponse:
    drop_id = request.path_params["drop_id"]
    bind(drop_id=drop_id)
    who = await require(request, Role.CREATOR)
    body = await open_giveaway(request.app, who, drop_id, await read_json(request))
    return JSONResponse(body, status_code=201,
                        headers={"location": f"/v1/drops/{drop_id}/giveaways/{body['id']}"})


async def _view(app: Any, row: dict[str, Any]) -> dict[str, Any]:
    if row["state"] == GiveawayState.DRAWN:
        return giveaway_json(row, won=await giveaway_store.winners(app.state.db, row["id"]))
    count = await giveaway_store.entries(app.state.redis, row["drop_id"], row["id"])
    return giveaway_json(row, entries=count)


async def http_list(request: Request) -> JSONResponse:
    drop_id = request.path_params["drop_id"]
    reject_unknown(dict(request.query_params), ())
    rows = await giveaway_store.list_giveaways(request.app.state.db, drop_id)
    return JSONResponse({"giveaways": [await _view(request.app, r) for r in rows]})


async def http_get(request: Request) -> JSONResponse:
    drop_id, giveaway_id = _ids(request)
    row = await giveaway_store.load_giveaway(request.app.state.db, drop_id, giveaway_id)
    if row is None:
        raise NotFound("no such giveaway in this drop", code=Refusal.NOT_FOUND.value)
    return JSONResponse(await _view(request.app, row))


async def http_entrants(request: Request) -> JSONResponse:
    """The sorted tickets the draw shuffled (after the draw; 409 before)."""
    drop_id, giveaway_id = _ids(request)
    row = await giveaway_store.load_giveaway(request.app.state.db, drop_id, giveaway_id)
    if row is None:
        raise NotFound("no such giveaway in this drop", code=Refusal.NOT_FOUND.value)
    if row["state"] != GiveawayState.DRAWN:
        raise Conflict("the entrants are published with the draw", code="not_drawn")
    tickets = await giveaway_store.entrants(request.app.state.db, giveaway_id)
    return JSONResponse({"giveaway_id": giveaway_id, "winners": row["winners"],
                         "commitment": row["commitment"], "seed": row["seed"],
                         "tickets": tickets})


async def http_enter(request: Request) -> JSONResponse:
    drop_id, giveaway_id = _ids(request)
    who = await principal(request)
    bind(user_id=who.user_id)
    reject_unknown(await read_json(request), ())
    present = who.user_id is not None and _present_here(request.app, who.user_id, drop_id)
    reply = await enter(request.app, who, drop_id, giveaway_id, present=present)
    return JSONResponse(reply, status_code=201 if reply["new"] else 200)


# -- lifecycle ----------------------------------------------------------------------------

async def startup(app: Starlette) -> None:
    gw = Giveaways(app)
    app.state.giveaways = gw
    app.state.commands["giveaway.enter"] = ws_enter
    hub = getattr(app.state, "realtime", None)
    if hub is not None:  # a winner's socket that missed giveaway.won gets it again
        hub.private.add_source(RecentWins(app.state.db))
    gw.start()


async def shutdown(app: Starlette) -> None:
    gw: Giveaways | None = getattr(app.state, "giveaways", None)
    if gw is not None:
        await gw.stop()


_GW = "/v1/drops/{drop_id:id}/giveaways"

part = Component(
    name="drops.giveaways",
    routes=[
        Route(_GW, guard_sales(http_open), methods=["POST"]),
        Route(_GW, http_list, methods=["GET"]),
        Route(_GW + "/{giveaway_id:id}", http_get, methods=["GET"]),
        Route(_GW + "/{giveaway_id:id}/entrants", http_entrants, methods=["GET"]),
        Route(_GW + "/{giveaway_id:id}/entries", http_enter, methods=["POST"]),
    ],
    startup=startup,
    shutdown=shutdown,
)
