"""Bidding and closing: the ``bid`` command, its HTTP route, the auction keeper.

* WebSocket command ``bid`` {auction_id, amount, idempotency_key} -> {auction_id, seq,
  amount, ends_at, server_time, extended, next_min, leading, replay}.
* HTTP: ``POST /v1/drops/{id}/auctions/{auction_id}/bids`` (docs/http-api.md,
  "Auctions").
* Background, in the node's chore worker (dropserver.chores): :class:`AuctionKeeper`
  closes what is due (the close script decides once, by Redis' clock), gives the
  winner's hold to the order pipeline, and copies accepted bids and the outcome to
  PostgreSQL. It sleeps until the next auction's end (soft-close extensions only move
  an end later: it wakes, reads the new end, sleeps again), at most
  ``KEEPER_IDLE_S``; a start on its own process wakes it at once.

A bid is one Redis round trip (``bid.lua`` through the buy path's auto-pipeline),
which also publishes ``auction.bid`` to every viewer; the outbid bidder's private
``auction.outbid`` goes off the hot path through checkout's :class:`Notifier`. No
PostgreSQL on the hot path: the keeper copies bids from the auction's bid stream.
The creator's routes (start, second chance, reading) are :mod:`drops.auctions`.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checkout import auction, auction_store
from checkout.auction import Bid, BidLimits, BidRequest, BidScript, Closed, History, Offer
from checkout.auction_rules import MAX_PRICE, check_idempotency_key
from checkout.retry import is_outage, until_done
from dropserver.auth import Principal, principal
from dropserver.background import Scheduled
from dropserver.chores import chores
from dropserver.component import Component
from dropserver.errors import ApiError, Unauthorized
from dropserver.http import field, read_json, reject_unknown
from dropserver.observability import bind, tally, tally_observe
from dropserver.redis_client import is_cluster
from realtime import channels

__all__ = ["AuctionKeeper", "Auctions", "bid", "part"]

log = logging.getLogger("dropserver.auctions")

BIDS = Counter("dropserver_bids_total", "Bids by outcome (accepted, replay or the refusal "
               "code)", ["result"])
BID_SECONDS = Histogram("dropserver_bid_seconds", "Time to answer a bid (script round trip "
                        "included)", buckets=(.0005, .001, .002, .005, .01, .025, .05, .1,
                                              .25, 1))
_BIDS_BY: dict[str, Any] = {}


def _count_bid(result: str) -> None:
    """``dropserver_bids_total{result}`` + 1, batched (:func:`tally`): most bids of a
    war are refusals, and in multi-process mode each ``inc()`` is a locked write."""
    child = _BIDS_BY.get(result)
    if child is None:
        child = _BIDS_BY[result] = BIDS.labels(result)
    tally(child)


CLOSES = Counter("dropserver_auction_closes_total", "Auctions closed by outcome", ["outcome"])

# How late a close may be: the keeper's next round after an auction's end when that
# round did not close it (Redis' clock not there yet, a failure), and after a close
# while its outcome is recorded. The round at the end itself is timed to it.
KEEPER_INTERVAL = 0.1
# The longest the keeper sleeps: an auction started on another process (another worker
# of the node, another node) is seen within this, well before it can end (an auction
# runs at least checkout.auction_rules.MIN_DURATION_S, 5 s). It was ten rounds a second
# whatever was due: ~10 Redis calls a second per worker with no auction at all.
KEEPER_IDLE_S = 1.0
RESTORE_EVERY_S = 2.0    # between looks for running auctions Redis lost
# The round at an end wakes this long after it: the close script judges by Redis'
# clock, and one a hair behind ours would answer "not due" (then the next round is
# KEEPER_INTERVAL later).
END_MARGIN_S = 0.005
RECORD_LOCK_MS = 5000
BID_FIELDS = frozenset({"auction_id", "amount", "idempotency_key"})
_WS_BID_FIELDS = BID_FIELDS | {"drop_id"}  # a socket not joined names the drop


class Auctions:
    """This process's auction machinery, kept on ``app.state.auctions``."""

    def __init__(self, app: Starlette) -> None:
        s = app.state.settings
        res = app.state.reservations   # the buy path's client, pipe, notifier, journal
        self.app = app
        self.redis = app.state.redis
        self.db = app.state.db
        self.history = History.from_settings(s)
        self.limits = BidLimits.from_settings(s)
        self.hold_ttl_ms = s.hold_ttl * 1000
        self.script = BidScript(res.batcher.pipe, is_cluster(res.hot_redis))
        self.notifier = res.notifier
        self.journal = res.journal
        self.bid_journal = auction_store.BidJournal(self.db)
        self.grace_ms = s.recovery_grace_ms
        self.keeper = AuctionKeeper(self)

    async def flow_for(self, user_id: str) -> str:
        return await auction_store.flow_for(self.db, user_id)

    def won(self, closed: Closed) -> None:
        """After this process closed an auction with a sale: the winner's hold goes to
        the hold journal (PostgreSQL, as a buy's), and the winner hears it."""
        if not closed.hold_id:
            return
        self.journal.add((closed.hold_id, closed.drop_id, closed.product_id, closed.winner,
                          1, closed.buyer_number, closed.amount, closed.amount,
                          closed.currency, f"auction:{closed.auction_id}", closed.expires_at,
                          closed.flow, closed.closed_at, "held", None))
        held = {"order_id": closed.hold_id, "product_id": closed.product_id,
                "buyer_number": closed.buyer_number, "expires_at": closed.expires_at,
                "amount": closed.amount, "currency": closed.currency}
        self.notifier.user_event(closed.winner, "auction.won", {
            "auction_id": closed.auction_id, "hold_id": closed.hold_id, **held,
            "flow": closed.flow})
        self.notifier.user_event(closed.winner, "order.held", held)
        self.notifier.stock_changed(closed.drop_id)

    def offered(self, row: dict[str, Any], offer: Offer) -> None:
        """After a second-chance offer: its hold to the journal, the bidder told."""
        d, p = row["drop_id"], row["product_id"]
        self.journal.add((offer.hold_id, d, p, offer.user_id, 1, offer.buyer_number,
                          offer.amount, offer.amount, row["currency"],
                          f"auction-offer:{offer.auction_id}", offer.expires_at, offer.flow,
                          offer.expires_at - self.hold_ttl_ms, "held", None))
        held = {"order_id": offer.hold_id, "product_id": p,
                "buyer_number": offer.buyer_number, "expires_at": offer.expires_at,
                "amount": offer.amount, "currency": row["currency"]}
        self.notifier.user_event(offer.user_id, "auction.offer", {
            "auction_id": offer.auction_id, "hold_id": offer.hold_id, **held,
            "flow": offer.flow})
        self.notifier.user_event(offer.user_id, "order.held", held)
        self.notifier.stock_changed(d)


class AuctionKeeper:
    """The node's chore worker runs one: closes due auctions, records bids and
    outcomes. Each round notes the earliest end of the auctions it saw running
    (:attr:`due_ms`): the next round is then, at most ``KEEPER_IDLE_S`` away."""

    def __init__(self, auctions: Auctions, interval: float = KEEPER_INTERVAL,
                 idle: float = KEEPER_IDLE_S) -> None:
        self.auctions = auctions
        self.redis = auctions.redis
        self.db = auctions.db
        self.token = secrets.token_hex(8)
        self.rounds = 0
        self.interval = interval
        self.due_ms: int | None = None  # the next end seen (unix ms), None: none
        self.away = False  # the last round met an outage of Redis or PostgreSQL
        self._restored_at = -RESTORE_EVERY_S
        self._outage_logged = -10.0
        self._loop = Scheduled("auction-keeper", self._step, log, "auction keeper",
                               max_wait=idle, retry=interval)
        self.start, self.stop, self.wake = self._loop.start, self._loop.stop, self._loop.wake

    async def _step(self) -> float | None:
        """One round, then the seconds until the next: to the next end, or
        ``interval`` when an end has passed and its auction is still open or being
        recorded (or Redis or PostgreSQL was away)."""
        self.due_ms = None
        self.away = False
        await self.tick()
        if self.away:
            return self.interval
        if self.due_ms is None:
            return None
        wait = (self.due_ms - time.time() * 1000) / 1000
        return wait + END_MARGIN_S if wait > 0 else self.interval

    async def tick(self) -> list[Closed]:
        """One round; an outage of Redis or PostgreSQL is logged once per 10 s (and
        :attr:`away` set), anything else as the loop logs failures."""
        try:
            return await self._round()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if time.monotonic() - self._outage_logged >= 10:
                self._outage_logged = time.monotonic()
                log.warning("auction keeper waits for Redis or PostgreSQL",
                            extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            self.away = True
            return []

    def _note_due(self, at_ms: int) -> None:
        if self.due_ms is None or at_ms < self.due_ms:
            self.due_ms = at_ms

    async def _round(self) -> list[Closed]:
        closed = []
        self.rounds += 1
        if time.monotonic() - self._restored_at >= RESTORE_EVERY_S:
            self._restored_at = time.monotonic()
            await self.restore_lost()
        members = await self.redis.smembers(auction.ACTIVE_AUCTIONS)
        for raw in members:
            text = raw.decode() if isinstance(raw, bytes) else raw
            drop_id, auction_id = (int(x) for x in text.split(":"))
            result = await self.keep(drop_id, auction_id)
            if result is not None:
                closed.append(result)
        return closed

    async def has(self, drop_id: int, auction_id: int, name: str, value: str) -> bool:
        """Whether a replica has the auction with ``name`` at ``value`` (the hold of a
        close or of an offer this process made): :meth:`_replicated`'s fence, then
        the auction read on the same primary; False when it is not that (a failover
        lost it). :class:`~checkout.redis_pipe.NotReplicated` while the replica lags."""
        await self._replicated(drop_id, auction_id)
        a = await auction.read(self.redis, drop_id, auction_id) or {}
        return str(a.get(name) or "") == value

    async def _won(self, result: Closed) -> None:
        """:meth:`Auctions.won` (the winner's hold journaled to PostgreSQL, the winner
        told) once a replica has the close: ``auction_close.lua`` made the hold and
        its buyer number on the primary, and a failover that loses them while
        PostgreSQL has the hold lets the promoted replica close the auction again
        with the same buyer number (as the order workers, checkout.order_worker). A
        lagging replica is waited out like an outage; a close a failover lost is
        neither journaled nor told (the auction, running again there, closes again)."""
        if not result.hold_id:
            self.auctions.won(result)  # nothing sold: nothing to journal or tell
            return
        kept = await until_done(
            lambda: self.has(result.drop_id, result.auction_id, "hold_id", result.hold_id),
            what="auction close waits for the replicas", log=log,
            extra={"drop_id": result.drop_id, "auction_id": result.auction_id})
        if kept:
            self.auctions.won(result)
        else:
            log.warning("auction close lost in a failover: not journaled nor told", extra={
                "drop_id": result.drop_id, "auction_id": result.auction_id,
                "hold_id": result.hold_id})

    async def _replicated(self, drop_id: int, auction_id: int) -> tuple[int, str]:
        """The auction's seq and state once a replica has them (see :meth:`record`);
        :class:`~checkout.redis_pipe.NotReplicated`, an outage, while it lags."""
        key = auction.auction_key(drop_id, auction_id)
        seq, state = await self.auctions.script.pipe.execute("EVAL", _FENCE, 2, key,
                                                             f"{key}:fence")
        return int(seq), state.decode() if isinstance(state, bytes) else str(state)

    async def restore_lost(self) -> list[int]:
        """Running auctions (PostgreSQL) that Redis lost, put back once their drop is
        loaded again (recovery rebuilds it); returns their ids. One Redis closed and
        lost before its close was recorded is recorded closed from the winner's order
        instead (its hold came back with the drop)."""
        from checkout import recovery

        restored = []
        for row in await auction_store.running_auctions(self.db):
            d, a = row["drop_id"], row["id"]
            if await self.redis.exists(auction.auction_key(d, a)):
                await self.redis.sadd(auction.ACTIVE_AUCTIONS, auction.member(d, a))
                continue
            if await auction_store.close_from_order(self.db, a):
                log.warning("auction closed in a lost Redis recorded from its order",
                            extra={"drop_id": d, "auction_id": a})
                continue
            if await recovery.ensure_loaded(self.db, self.redis, d,
                                            grace_ms=self.auctions.grace_ms,
                                            wait=0.5) != "loaded":
                continue
            await self.auctions.bid_journal.flush()  # what this process still holds
            bids = await auction_store.load_bids(self.db, a)
            bans = await auction_store.active_bans(self.db, d, row["creator_id"])
            if bans:  # the chat's moderation hash went with Redis too
                await self.redis.hset(channels.chat_key(d, "blocked"), mapping=bans)
            if await auction.restore(self.redis, row, bids):
                restored.append(a)
                log.warning("auction restored from PostgreSQL after a Redis loss",
                            extra={"drop_id": d, "auction_id": a, "bids": len(bids)})
        return restored

    async def keep(self, drop_id: int, auction_id: int) -> Closed | None:
        """One auction's round: close it if due, copy its new bids, record its end."""
        a = await auction.read(self.redis, drop_id, auction_id)
        if a is None:  # Redis lost it: restore_lost() puts it back from PostgreSQL
            log.warning("an active auction is gone from Redis",
                        extra={"drop_id": drop_id, "auction_id": auction_id})
            await self.redis.srem(auction.ACTIVE_AUCTIONS, auction.member(drop_id, auction_id))
            return None
        result = None
        if a["state"] == "running" and time.time() * 1000 >= a["ends_at"] - 50:
            result = await auction.close(
                self.redis, drop_id, auction_id, hold_ttl_ms=self.auctions.hold_ttl_ms,
                history=self.auctions.history, flow_for=self.auctions.flow_for)
            if result is not None:
                CLOSES.labels(result.outcome.value).inc()
                log.info("auction closed", extra={
                    "drop_id": drop_id, "auction_id": auction_id,
                    "outcome": result.outcome.value, "bids": result.seq,
                    "amount": result.amount, "hold_id": result.hold_id})
                await self._won(result)
                a = await auction.read(self.redis, drop_id, auction_id) or a
        # Running: due at its end (a bid's extension is read the round it wakes);
        # closed but still watched (its outcome not recorded yet): due now.
        self._note_due(int(a["ends_at"]) if a["state"] == "running" else 0)
        await self.record(drop_id, auction_id, a)
        return result

    async def record(self, drop_id: int, auction_id: int, a: dict[str, Any]) -> None:
        """Copy new bids to PostgreSQL; once closed and every bid is there, write the
        outcome and stop watching the auction. One process at a time per auction.

        Only what a replica has (as the order workers, checkout.order_worker): the
        auction's seq and state are taken with a write on its primary, and the
        pipeline's ``WAIT`` after it (the buy path's, with ``DROPSERVER_HOLD_REPLICAS``)
        says a replica has them; bids up to that seq were written before, so they are
        there too. A bid whose ``WAIT`` failed (its bidder was answered 503) or a close a
        lagging failover then loses is not recorded: PostgreSQL never gets ahead of the
        replica a failover promotes, which could give that ``seq`` again."""
        lock = f"{auction.auction_key(drop_id, auction_id)}:recorder"
        if not await self.redis.set(lock, self.token, nx=True, px=RECORD_LOCK_MS):
            return
        try:
            seq, state = await self._replicated(drop_id, auction_id)
            recorded = await auction_store.max_seq(self.db, auction_id)
            while recorded < seq:
                bids = [b for b in await auction.read_bids(self.redis, drop_id, auction_id,
                                                           recorded) if b["seq"] <= seq]
                if not bids:
                    break
                await auction_store.record_bids(self.db, auction_id, bids)
                recorded = bids[-1]["seq"]
            if state == "closed" and recorded >= seq:
                a = await auction.read(self.redis, drop_id, auction_id) or {}
                if a.get("state") != "closed" or int(a.get("seq") or 0) != seq:
                    return  # not the close a replica has (a failover in between)
                await auction_store.record_close(self.db, auction_id, a)
                await self.redis.srem(auction.ACTIVE_AUCTIONS,
                                      auction.member(drop_id, auction_id))
        finally:
            if await self.redis.get(lock) in (self.token, self.token.encode()):
                await self.redis.delete(lock)


# The auction's seq and state as they are on its primary, and a write: the WAIT the
# pipeline sends after it covers everything this primary had when they were read.
_FENCE = """
local v = redis.call('HMGET', KEYS[1], 'seq', 'state')
redis.call('SET', KEYS[2], '1', 'PX', 60000)
return {v[1] or '0', v[2] or ''}
"""


def _state(app: Any) -> Auctions:
    return app.state.auctions


def _redis_away() -> ApiError:
    return ApiError("bidding is paused for a moment, retry shortly", code="unavailable",
                    status=503, headers={"Retry-After": "1"})


async def bid(app: Any, who: Principal, drop_id: int, auction_id: int, data: dict[str, Any],
              *, ip: str, idempotency_key: str | None = None) -> Bid:
    """The bid path shared by the ``bid`` command and the HTTP route."""
    started = time.perf_counter()
    if who.is_guest:
        raise Unauthorized("sign in to bid", code="token_missing")
    amount = field(data, "amount", int, min_value=1, max_value=MAX_PRICE)
    key = check_idempotency_key(idempotency_key or field(data, "idempotency_key", str,
                                                         max_len=255))
    user_id = who.user_id or ""
    if "\n" in user_id:
        raise Unauthorized("bad user id", code="token_invalid")
    req = BidRequest(drop_id=drop_id, auction_id=auction_id, user_id=user_id, amount=amount,
                     idempotency_key=key, name=who.name or user_id, ip=ip)
    auctions = _state(app)
    try:
        result = await auctions.script(req, auctions.limits, auctions.history)
    except ApiError as exc:
        _count_bid(exc.code)
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError):
        log.warning("redis unavailable for a bid", exc_info=True)
        raise _redis_away() from None
    finally:
        tally_observe(BID_SECONDS, time.perf_counter() - started)
    _count_bid("replay" if result.replay else "accepted")
    if not result.replay:
        auctions.bid_journal.add((auction_id, {
            "seq": result.seq, "user_id": user_id, "display_name": req.name,
            "amount": result.amount, "at_ms": result.at, "ends_at_ms": result.ends_at,
            "extended": result.extended, "idempotency_key": key}))
    if not result.replay and result.outbid and result.outbid != user_id:
        auctions.notifier.user_event(result.outbid, "auction.outbid", {
            "auction_id": auction_id, "amount": result.amount,
            "your_amount": result.outbid_amount, "next_min": result.next_min,
            "ends_at": result.ends_at, "server_time": result.at})
    return result


async def ws_bid(app: Any, ctx: Any, data: dict) -> dict:
    reject_unknown(data, _WS_BID_FIELDS)
    drop_id = getattr(ctx, "drop_id", None)
    if drop_id is None:  # not from a joined socket: the drop is named in the command
        drop_id = field(data, "drop_id", int, min_value=1)
    auction_id = field(data, "auction_id", int, min_value=1, max_value=2**62)
    result = await bid(app, ctx.principal, int(drop_id), auction_id, data,
                       ip=getattr(ctx, "ip", "") or "")
    return result.reply()


async def http_bid(request: Request) -> JSONResponse:
    who = await principal(request)
    drop_id = request.path_params["drop_id"]
    auction_id = request.path_params["auction_id"]
    bind(drop_id=drop_id, user_id=who.user_id)
    data = await read_json(request)
    reject_unknown(data, BID_FIELDS - {"auction_id"})
    client = request.client.host if request.client else ""
    result = await bid(request.app, who, drop_id, auction_id, data, ip=client,
                       idempotency_key=request.headers.get("idempotency-key"))
    return JSONResponse(result.reply(), status_code=200 if result.replay else 201)


async def startup(app: Starlette) -> None:
    auctions = Auctions(app)
    app.state.auctions = auctions
    app.state.commands["bid"] = ws_bid
    auctions.bid_journal.start()
    if chores(app):  # one keeper per node (dropserver.chores)
        auctions.keeper.start()


async def shutdown(app: Starlette) -> None:
    auctions: Auctions | None = getattr(app.state, "auctions", None)
    if auctions is not None:
        await auctions.keeper.stop()
        await auctions.bid_journal.stop()


routes = [
    Route("/v1/drops/{drop_id:id}/auctions/{auction_id:id}/bids", http_bid,
          methods=["POST"]),
]

part = Component(name="checkout.auctions", routes=routes, startup=startup,
                 shutdown=shutdown)

