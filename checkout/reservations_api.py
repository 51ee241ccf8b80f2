"""Reservations: the buy command, holds, bot defence, recovery (routes and hooks).

* WebSocket commands (contract 3): ``buy`` {product_id, variant_id?, quantity?,
  idempotency_key, flow?, proof?} -> {hold_id, buyer_number, expires_at, amount,
  currency, remaining, ...}; ``cancel_hold`` {hold_id} -> {hold_id, state, remaining}.
* HTTP: ``POST /v1/drops/{id}/buy``, ``GET /v1/holds/{hold_id}``,
  ``DELETE /v1/holds/{hold_id}`` (docs/http-api.md, section Checkout).
* Background, in the node's chore worker (dropserver.chores): the hold sweeper, the
  recovery check and the reconciler (checkout/reconcile.py); in every process: the
  notifier and the hold journal.

After a buy the answer goes straight back on the socket (one Redis round trip), with
the buyer's private ``order.held`` in the same message; the new hold is also queued
for PostgreSQL (:mod:`checkout.journal`, so a Redis loss cannot take it); what others
see is sent off the hot path by :class:`Notifier`: ``order.held`` for the buyer's other sockets
(auto-pipelined with the buys; the socket that bought is skipped), the drop's
``stock`` (volatile, at most one per ``DROPSERVER_STOCK_COALESCE_MS`` per process and
drop), and the drops package's sold-out / back-in-stock transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import defense, holds, inventory, journal, keys, reconcile, recovery
from checkout.defense import BuyAttempt, BuyLimits
from checkout.holds import Reason, ReleaseResult, Sweeper
from checkout.redis_pipe import AutoPipeline
from checkout.reserve import (
    BuyRefused,
    BuyRequest,
    Hold,
    Refusal,
    ReserveBatcher,
    hot_path_client,
    parse_reply,
    reserve_batched,
    script_call,
)
from dropserver.auth import Principal, Role, principal
from dropserver.background import stop_task
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError, NotFound, Unauthorized, ValidationFailed
from dropserver.http import field, read_json, reject_unknown
from dropserver.observability import bind, tally, tally_label, tally_observe
from realtime.protocol import private_frame

__all__ = ["Notifier", "Reservations", "buy", "cancel", "part"]

log = logging.getLogger("dropserver.checkout")

RESERVATIONS = Counter("dropserver_reservations_total",
                       "Buy attempts by outcome (held, replay or the refusal code)",
                       ["result"])
RESERVE_SECONDS = Histogram("dropserver_reserve_seconds",
                            "Time to answer a buy attempt (script round trip included)",
                            buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, 1))
_HELD = RESERVATIONS.labels("held")
_REPLAYED = RESERVATIONS.labels("replay")
RELEASES = Counter("dropserver_hold_releases_total", "Holds released", ["reason"])

_NOT_LIVE_CACHE_S = 1.0
# What a buy may carry (HTTP body and WebSocket command alike); anything else is 422.
BUY_FIELDS = frozenset({"product_id", "variant_id", "quantity", "idempotency_key", "flow",
                        "proof"})


class Notifier:
    """Sends what a buy or a release tells others, batched, off the hot path."""

    def __init__(self, app: Starlette, redis: Any, coalesce_ms: int,
                 pipe: AutoPipeline) -> None:
        self.app = app
        self.redis = redis
        self.pipe = pipe  # the buys' auto-pipelined connection (owned by Reservations)
        self.coalesce = max(coalesce_ms, 1) / 1000
        self._user_events: list[tuple[str, str, dict, str]] = []
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None

    # -- called on the hot path (no awaits) ---------------------------------
    def user_event(self, user_id: str, event: str, data: dict, origin: str = "") -> None:
        """``origin``: the connection that already has the event (see publish_user)."""
        self._user_events.append((user_id, event, data, origin))
        self._wake.set()

    def stock_changed(self, drop_id: int) -> None:
        self._dirty.add(drop_id)
        self._wake.set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the flusher ----------------------------------------------------------
    async def flush(self) -> None:
        from dropserver.redis_client import publish_command
        from realtime.publish import publish_volatile, user_message

        events, self._user_events = self._user_events, []
        dirty, self._dirty = self._dirty, set()
        if events:
            pipe, command = self.pipe, publish_command(self.redis)
            await asyncio.gather(*[
                pipe.execute(command, *user_message(user_id, event, data, origin=origin))
                for user_id, event, data, origin in events])
        for drop_id in dirty:
            await publish_volatile(self.redis, drop_id, "stock",
                                   await inventory.stock_event(self.redis, drop_id))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("checkout notifications failed", exc_info=True)
            # Stock updates at most once per coalescing interval.
            await asyncio.sleep(self.coalesce)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="checkout-notifier")

    async def stop(self) -> None:
        if self._loop is not None:
            await stop_task(self._loop, log)
        with contextlib.suppress(Exception):
            await self.flush()
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)

    # -- drop state transitions (owned by the drops package) -------------------
    def sold_out(self, drop_id: int, product_id: int) -> None:
        from drops.actions import mark_sold_out

        self.spawn(self._guard(mark_sold_out, self.app, self.redis, drop_id, product_id))

    def back_in_stock(self, drop_id: int, product_id: int) -> None:
        from drops.actions import mark_back_in_stock

        self.spawn(self._guard(mark_back_in_stock, self.app, self.redis, drop_id,
                               product_id))

    @staticmethod
    async def _guard(update: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``update(*args)``, logging a failure. The update's coroutine is made
        here, in the task: one made by the caller was left never awaited when the task
        was cancelled before its first step (the loop's last turn at shutdown)."""
        try:
            await update(*args)
        except Exception:
            log.warning("drop state update failed", exc_info=True)


class Reservations:
    """This process's reservation machinery, kept on ``app.state.reservations``."""

    def __init__(self, app: Starlette) -> None:
        s = app.state.settings
        self.app = app
        self.redis = app.state.redis
        self.db = app.state.db
        # The buy path's own client: C packing (reserve.py); its auto-pipelined
        # connection carries the reserve calls and the buyers' order.held publishes.
        self.hot_redis = hot_path_client(s.redis_url)
        self.batcher = ReserveBatcher(self.hot_redis,
                                      wait_replicas=s.effective_hold_replicas,
                                      wait_timeout_ms=s.hold_replica_timeout_ms)
        self.hold_ttl_ms = s.hold_ttl * 1000
        self.limits = BuyLimits.from_settings(s)
        self.grace_ms = s.recovery_grace_ms
        existing = getattr(app.state, "buy_verifier", None)
        self.verifier = existing if existing is not None else defense.load_verifier(
            s.buy_verifier)
        self.notifier = Notifier(app, self.hot_redis, s.stock_coalesce_ms,
                                 pipe=self.batcher.pipe)
        self.sweeper = Sweeper(self.redis, s.hold_sweep_interval, self.on_release)
        self.recovery = recovery.RecoveryLoop(self.db, self.redis, s.recovery_interval,
                                              s.recovery_grace_ms)
        self.reconciler = (reconcile.Reconciler(self.db, self.redis, s.reconcile_interval)
                           if s.reconcile_interval > 0 else None)
        self.journal = journal.HoldJournal(self.db)
        self._not_live: dict[int, float] = {}
        self._loading: dict[int, asyncio.Task] = {}

    async def on_release(self, result: ReleaseResult) -> None:
        # The buyer hears order.expired / order.cancelled from the order worker once it
        # has recorded the release (checkout/orders.py, OrderProcessor.tell): one voice
        # per outcome, so never twice.
        RELEASES.labels(result.state).inc()
        self.notifier.stock_changed(result.drop_id)
        if result.remaining == result.quantity:  # it was sold out a moment ago
            self.notifier.back_in_stock(result.drop_id, result.product_id)

    async def reserve(self, req: BuyRequest) -> Hold:
        # The rush's path, one coroutine deep: the script's reply parsed here, a
        # refusal raised once (not caught and raised again on its way out).
        try:
            key_list, args = script_call(req, self.hold_ttl_ms, self.limits)
            reply = await self.batcher.call(key_list, args)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # Redis is restarting or failing over: say so, the client retries.
            log.warning("redis unavailable for a buy", exc_info=True)
            raise _redis_away() from None
        if _not_ready(reply):
            try:
                return await self._reserve_unloaded(req)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                log.warning("redis unavailable for a buy", exc_info=True)
                raise _redis_away() from None
        return parse_reply(req, reply)

    async def cancel(self, hold_id: str, owner: str) -> ReleaseResult:
        """The buyer's cancel (``release.lua``, reason ``cancelled``)."""
        try:
            result = await holds.release(self.redis, hold_id, Reason.CANCELLED, owner=owner)
            if result.error == "not_found" and await self.load_for(hold_id):
                result = await holds.release(self.redis, hold_id, Reason.CANCELLED,
                                             owner=owner)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            log.warning("redis unavailable for a cancel", exc_info=True)
            raise _redis_away() from None
        return result

    async def get_hold(self, hold_id: str) -> dict[str, Any] | None:
        try:
            record = await holds.get_hold(self.redis, hold_id)
            if record is None and await self.load_for(hold_id):
                record = await holds.get_hold(self.redis, hold_id)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise _redis_away() from None
        return record

    async def load_for(self, hold_id: str) -> bool:
        """Redis does not know ``hold_id``: if its drop is not loaded (Redis came back
        empty and nothing has rebuilt it yet) the hold may well exist in PostgreSQL, so
        load the drop first, as a buy does. True when the caller should look again;
        503 ``not_ready`` while another process is still rebuilding."""
        ref = keys.parse_hold_id(hold_id)
        if ref is None or await recovery.is_loaded(self.redis, ref.drop_id):
            return False
        outcome = await self._ensure_loaded(ref.drop_id)
        if outcome == "busy":
            raise ApiError("sales are resuming after a Redis loss, retry shortly",
                           code="not_ready", status=503, headers={"Retry-After": "1"})
        return outcome == "loaded"

    async def _reserve_unloaded(self, req: BuyRequest) -> Hold:
        """The script said ``not_ready``: the drop is not loaded, after a Redis loss
        (rebuild from PostgreSQL first) or because it is not live at all."""
        until = self._not_live.get(req.drop_id, 0.0)
        if until > time.monotonic():
            raise BuyRefused(Refusal.NOT_SELLING, "drop is not live")
        outcome = await self._ensure_loaded(req.drop_id)
        if outcome == "not_live":
            self._not_live[req.drop_id] = time.monotonic() + _NOT_LIVE_CACHE_S
            raise BuyRefused(Refusal.NOT_SELLING, "drop is not live")
        if outcome == "busy":
            raise BuyRefused(Refusal.NOT_READY)
        return await reserve_batched(self.batcher, req, hold_ttl_ms=self.hold_ttl_ms,
                                     limits=self.limits)


    async def _ensure_loaded(self, drop_id: int) -> str:
        """One rebuild-or-wait per drop and process, however many buyers are waiting."""
        task = self._loading.get(drop_id)
        if task is None:
            task = asyncio.create_task(recovery.ensure_loaded(
                self.db, self.redis, drop_id, grace_ms=self.grace_ms, wait=3.0))
            self._loading[drop_id] = task
            task.add_done_callback(lambda _t: self._loading.pop(drop_id, None))
        return await asyncio.shield(task)


def _not_ready(reply: Any) -> bool:
    """reserve.lua refused with ``not_ready`` (the drop is not loaded)."""
    head = reply[0]
    if head == b"ok" or head == "ok":
        return False
    code = reply[1]
    return code == b"not_ready" or code == "not_ready"


def _redis_away() -> ApiError:
    return ApiError("sales are paused for a moment, retry shortly", code="unavailable",
                    status=503, headers={"Retry-After": "1"})


def _state(app: Any) -> Reservations:
    return app.state.reservations


async def buy(app: Any, who: Principal, drop_id: int, data: dict[str, Any], *, ip: str,
              idempotency_key: str | None = None, origin: str = "",
              ) -> tuple[Hold, dict[str, Any], dict[str, Any] | None]:
    """The buy path shared by the ``buy`` command and ``POST /v1/drops/{id}/buy``.

    Returns the hold, the reply and, for a new hold, the buyer's ``order.held``
    data; ``origin`` (a connection id) is the socket that sends that event itself
    (a replay's is told by the reply alone).
    """
    started = time.perf_counter()
    if who.is_guest:
        raise Unauthorized("sign in to buy", code="token_missing")
    reject_unknown(data, BUY_FIELDS)
    product_id = field(data, "product_id", int, min_value=1, max_value=2**62)
    quantity = field(data, "quantity", int, default=1, min_value=1, max_value=100)
    key = idempotency_key or field(data, "idempotency_key", str, max_len=255)
    flow = field(data, "flow", str, default="", max_len=32)
    variant_id = field(data, "variant_id", int, default=None, min_value=1, max_value=2**62)
    req = BuyRequest(drop_id=drop_id, product_id=product_id, user_id=who.user_id or "",
                     idempotency_key=key, quantity=quantity, ip=ip, flow=flow,
                     variant_id=variant_id)
    req.validate()
    res = _state(app)
    try:
        if not isinstance(res.verifier, defense.AcceptAll):
            await defense.check(res.verifier, BuyAttempt(req.user_id, drop_id, product_id,
                                                         ip, data.get("proof")))
        hold = await res.reserve(req)
    except ApiError as exc:
        tally_label(RESERVATIONS, exc.code)
        raise
    finally:
        tally_observe(RESERVE_SECONDS, time.perf_counter() - started)
    tally(_REPLAYED if hold.replay else _HELD)
    # A replay too: its first attempt may have been answered 503 (no replica had the
    # hold in time: the WAIT), and so neither journaled nor told; each step is
    # idempotent (the journal's row ON CONFLICT DO NOTHING, a socket hears an order's
    # event once, mark_sold_out reads Redis' units left again).
    res.journal.add(journal.row_for(hold, req, res.hold_ttl_ms))
    held = {"order_id": hold.hold_id, "product_id": product_id,
            "buyer_number": hold.buyer_number, "expires_at": hold.expires_at,
            "amount": hold.amount, "currency": hold.currency}
    if variant_id is not None:
        held["variant_id"] = variant_id
    res.notifier.user_event(req.user_id, "order.held", held, origin)
    res.notifier.stock_changed(drop_id)
    if hold.remaining == 0:
        res.notifier.sold_out(drop_id, product_id)
    # The requesting socket has the hold in the replay's reply; the user's other
    # sockets hear order.held through the channel, only if they have not yet.
    return hold, hold.reply(), None if hold.replay else held


async def cancel(app: Any, who: Principal, hold_id: str) -> dict[str, Any]:
    """The buyer cancels their own hold (release.lua with reason ``cancelled``)."""
    if who.is_guest:
        raise Unauthorized("sign in to cancel a hold", code="token_missing")
    if not isinstance(hold_id, str) or not hold_id:
        raise ValidationFailed("hold_id is required", details={"field": "hold_id"})
    result = await _state(app).cancel(hold_id, who.user_id or "")
    if result.error:  # not_found, not_owner: the same answer, leak nothing
        raise NotFound("no such hold", code="hold_not_found")
    if not result.released:
        raise ApiError(f"the hold is {result.state}", code="hold_not_active", status=409,
                       details={"state": result.state})
    await _state(app).on_release(result)
    return {"hold_id": hold_id, "state": "cancelled", "remaining": result.remaining}


# -- WebSocket commands (contract 3) ------------------------------------------------

async def ws_buy(app: Any, ctx: Any, data: dict) -> dict:
    drop_id = getattr(ctx, "drop_id", None)
    if drop_id is None:  # not from a joined socket: the drop is named in the command
        drop_id = field(data, "drop_id", int, min_value=1)
        data = {k: v for k, v in data.items() if k != "drop_id"}
    conn_id = getattr(ctx, "conn_id", "")
    after = getattr(ctx, "after", None)
    _hold, reply, held = await buy(app, ctx.principal, int(drop_id), data,
                                   ip=getattr(ctx, "ip", "") or "",
                                   origin=conn_id if after is not None else "")
    if held is not None and after is not None:
        # In the same message as the reply: one write, and the buyer sees both at once.
        after.append(private_frame("order.held", held))
    return reply


async def ws_cancel_hold(app: Any, ctx: Any, data: dict) -> dict:
    reject_unknown(data, ("hold_id",))
    return await cancel(app, ctx.principal, field(data, "hold_id", str, max_len=64))


# -- HTTP -----------------------------------------------------------------------------

def _ip(request: Request) -> str:
    return request.client.host if request.client else ""


async def http_buy(request: Request) -> JSONResponse:
    who = await principal(request)
    drop_id = request.path_params["drop_id"]
    bind(drop_id=drop_id, user_id=who.user_id)
    data = await read_json(request)
    header = request.headers.get("idempotency-key")
    hold, reply, _held = await buy(request.app, who, drop_id, data, ip=_ip(request),
                                   idempotency_key=header)
    return JSONResponse(reply, status_code=200 if hold.replay else 201,
                        headers={"Location": f"/v1/holds/{hold.hold_id}"})


async def http_get_hold(request: Request) -> JSONResponse:
    who = await principal(request)
    if who.is_guest:
        raise Unauthorized("sign in to see your holds", code="token_missing")
    record = await _state(request.app).get_hold(request.path_params["hold_id"])
    if record is None or (record["user_id"] != who.user_id and who.role is not Role.ADMIN):
        raise NotFound("no such hold", code="hold_not_found")
    return JSONResponse(record)


async def http_cancel_hold(request: Request) -> JSONResponse:
    who = await principal(request)
    return JSONResponse(await cancel(request.app, who, request.path_params["hold_id"]))


# -- lifecycle ----------------------------------------------------------------------

async def startup(app: Starlette) -> None:
    from dropserver.redis_client import ready

    res = Reservations(app)
    await ready(res.hot_redis)
    app.state.reservations = res
    app.state.commands["buy"] = ws_buy
    app.state.commands["cancel_hold"] = ws_cancel_hold
    res.notifier.start()
    res.journal.start()
    if chores(app):  # the node's chores: one worker per node (dropserver.chores)
        res.sweeper.start()
        res.recovery.start()
        if res.reconciler is not None:
            res.reconciler.start()


async def shutdown(app: Starlette) -> None:
    res: Reservations | None = getattr(app.state, "reservations", None)
    if res is None:
        return
    await res.recovery.stop()
    if res.reconciler is not None:
        await res.reconciler.stop()
    await res.sweeper.stop()
    await res.notifier.stop()
    await res.journal.stop()
    await res.batcher.aclose()
    await res.hot_redis.aclose()


routes = [
    Route("/v1/drops/{drop_id:id}/buy", http_buy, methods=["POST"]),
    Route("/v1/holds/{hold_id}", http_get_hold, methods=["GET"]),
    Route("/v1/holds/{hold_id}", http_cancel_hold, methods=["DELETE"]),
]

part = Component(name="checkout.reservations", routes=routes, startup=startup,
                 shutdown=shutdown)
