"""Auctions in Redis: start, bid, close, second-chance offer; the scripts' adapter.

Each decision is one atomic Lua script (``scripts/auction_start.lua``, ``bid.lua``,
``auction_close.lua``, ``auction_offer.lua``, each prepended with
``auction_lib.lua``), every key of it under the drop's hash tag so it runs on a
Redis Cluster too. A script that changes what viewers see appends its event to the
drop's history and publishes it in the same step (``auction.started``,
``auction.bid``, ``auction.closed``), so event positions follow the order of the
decisions. Rules and refusals: :mod:`checkout.auction_rules`.

Layout (D = drop id, A = auction id)::

    {drop:D}:auction:A        HASH   rules, state, clock (ends_at), seq, leader, amount,
                                     outcome, the winner's hold, a second-chance offer
    {drop:D}:auction:A:bids   STREAM every accepted bid, id <seq>-1 (PostgreSQL gets
                                     them from here, :mod:`checkout.auctions_api`)
    {drop:D}:auction:A:idem   HASH   "<user>\\n<key>" -> the first answer
    {drop:D}:rl:bid:u:<user>  HASH   sliding-window bid attempts of one user
    {drop:D}:rl:bid:ip:<ip>   HASH   sliding-window bid attempts of one address
    checkout:auctions         SET    "D:A" of auctions not yet closed and recorded
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from checkout import keys
from checkout.auction_rules import (
    AuctionSpec,
    BidRefusal,
    BidRefused,
    Outcome,
    encode_increments,
)
from checkout.defense import RATE_WINDOW_MS
from dropserver.redis_client import ClusterAwareScript
from realtime import channels
from realtime.publish import new_epoch

__all__ = [
    "ACTIVE_AUCTIONS",
    "AuctionError",
    "Bid",
    "BidLimits",
    "BidRequest",
    "BidScript",
    "Closed",
    "History",
    "Offer",
    "auction_key",
    "bids_key",
    "close",
    "offer",
    "read",
    "read_bids",
    "restore",
    "start",
]

ACTIVE_AUCTIONS = "checkout:auctions"
KEEP_MS = 7 * 24 * 3600 * 1000   # an auction's keys outlive it a week (audit, replays)
_DIR = Path(__file__).resolve().parent / "scripts"


def auction_key(drop_id: int, auction_id: int) -> str:
    return f"{keys.tag(drop_id)}:auction:{int(auction_id)}"


def bids_key(drop_id: int, auction_id: int) -> str:
    return f"{auction_key(drop_id, auction_id)}:bids"


def idem_key(drop_id: int, auction_id: int) -> str:
    return f"{auction_key(drop_id, auction_id)}:idem"


def rate_user(drop_id: int, user_id: str) -> str:
    return f"{keys.tag(drop_id)}:rl:bid:u:{user_id}"


def rate_ip(drop_id: int, ip: str) -> str:
    return f"{keys.tag(drop_id)}:rl:bid:ip:{ip}"


def member(drop_id: int, auction_id: int) -> str:
    return f"{int(drop_id)}:{int(auction_id)}"


@cache
def _script(name: str) -> ClusterAwareScript:
    source = (_DIR / "auction_lib.lua").read_bytes() + b"\n" + (_DIR / f"{name}.lua").read_bytes()
    return ClusterAwareScript(source)


class AuctionError(Exception):
    """A start, close or offer the scripts refused: ``code`` says why."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class History:
    """The drop history's limits (settings ``history_size``, ``history_ttl``)."""

    size: int = 1000
    ttl: int = 86400

    def args(self, drop_id: int) -> list[Any]:
        return [channels.drop_channel(drop_id), new_epoch(), self.size, self.ttl]

    @classmethod
    def from_settings(cls, settings: Any) -> History:
        return cls(settings.history_size, settings.history_ttl)


# -- start -----------------------------------------------------------------------------

async def start(redis: Any, drop_id: int, auction_id: int, spec: AuctionSpec, *,
                currency: str, creator_id: str, history: History) -> tuple[int, int]:
    """Start the auction in Redis; returns ``(started_at, ends_at)`` (unix ms, Redis'
    clock). Raises :class:`AuctionError` (``not_ready``, ``product_not_loaded``,
    ``product_selling``, ``no_stock``, ``auction_exists``)."""
    d, p = drop_id, spec.product_id
    reply = await _script("auction_start")(
        keys=[auction_key(d, auction_id), keys.product(d, p), keys.meta(d),
              channels.meta_key(d), channels.history_key(d)],
        args=[auction_id, d, p, currency, spec.start_price,
              encode_increments(spec.increments), spec.reserve_price or 0,
              spec.duration_ms, spec.snipe_window_ms, creator_id,
              *history.args(d), KEEP_MS],
        client=redis)
    if _s(reply[0]) != "ok":
        raise AuctionError(_s(reply[1]), _s(reply[2]))
    await redis.sadd(ACTIVE_AUCTIONS, member(d, auction_id))
    return int(reply[1]), int(reply[2])


# -- bid -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BidLimits:
    """Attempt limits bid.lua enforces, per drop (0 turns one off): the buy path's
    windows (checkout/defense.py), counted apart from buy attempts."""

    window_ms: int = RATE_WINDOW_MS
    per_user: int = 10
    per_ip: int = 100

    @classmethod
    def from_settings(cls, settings: Any) -> BidLimits:
        return cls(per_user=settings.buy_rate_per_user, per_ip=settings.buy_rate_per_ip)


@dataclass(frozen=True, slots=True)
class BidRequest:
    drop_id: int
    auction_id: int
    user_id: str
    amount: int
    idempotency_key: str
    name: str = ""
    ip: str = ""


@dataclass(frozen=True, slots=True)
class Bid:
    """An accepted bid as the bidder sees it."""

    auction_id: int
    seq: int
    amount: int
    ends_at: int             # unix ms, after this bid
    at: int                  # Redis' clock when accepted (server time)
    extended: bool           # the bid reset the clock (anti-snipe)
    outbid: str              # the user it outbid ('' = none)
    outbid_amount: int       # that user's bid
    next_min: int            # the lowest bid accepted after this one
    replay: bool = False

    def reply(self) -> dict[str, Any]:
        return {"auction_id": self.auction_id, "seq": self.seq, "amount": self.amount,
                "ends_at": self.ends_at, "server_time": self.at, "extended": self.extended,
                "next_min": self.next_min, "leading": True, "replay": self.replay}


@lru_cache(maxsize=1024)
def _auction_keys(drop_id: int, auction_id: int) -> tuple[str, ...]:
    """What every bid on one auction names alike: its keys, the drop's channel and
    the prefix of the attempt counters' keys. Built once per auction, not per bid (a
    war is thousands of bids a second on one auction)."""
    d, a = drop_id, auction_id
    return (auction_key(d, a), bids_key(d, a), idem_key(d, a),
            channels.chat_key(d, "blocked"), channels.meta_key(d), channels.history_key(d),
            channels.drop_channel(d), rate_user(d, ""), rate_ip(d, ""))


def bid_call(req: BidRequest, limits: BidLimits, history: History,
             ) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of bid.lua for one request (see the script's header)."""
    auction, bids, idem, blocked, meta, hist, channel, rl_user, rl_ip = _auction_keys(
        req.drop_id, req.auction_id)
    key_list = [auction, bids, idem, rl_user + req.user_id, rl_ip + (req.ip or "-"),
                blocked, meta, hist]
    args = [req.user_id, req.amount, req.idempotency_key, req.name or req.user_id,
            limits.window_ms, limits.per_user, limits.per_ip,
            channel, new_epoch(), history.size, history.ttl, KEEP_MS]
    return key_list, args


_REFUSALS = {r.value.encode(): r for r in BidRefusal}  # the script's codes, as read


def parse_bid(req: BidRequest, reply: list[Any]) -> Bid:
    """bid.lua's reply -> :class:`Bid`, or raise :class:`BidRefused`."""
    if reply[0] != b"ok" and reply[0] != "ok":
        code = reply[1]
        raise BidRefused(_REFUSALS.get(code) or BidRefusal(_s(code)), detail=_s(reply[2]),
                         min_amount=int(reply[3]), ends_at=int(reply[4]),
                         server_time=int(reply[5]))
    return Bid(auction_id=req.auction_id, seq=int(reply[1]), amount=int(reply[2]),
               ends_at=int(reply[3]), at=int(reply[4]), extended=bool(int(reply[5])),
               outbid=_s(reply[6]), replay=bool(int(reply[7])), next_min=int(reply[8]),
               outbid_amount=int(reply[9]))


class BidScript:
    """bid.lua through an auto-pipeline (the buy path's, :mod:`checkout.redis_pipe`):
    bids that arrive in one event-loop turn leave in one write. On NOSCRIPT the
    script is loaded once, however many calls hit it, and the call sent again."""

    def __init__(self, pipe: Any, cluster: bool) -> None:
        both = _script("bid")
        self.lua = both.sharded if cluster else both.single
        self.pipe = pipe
        self._loading: asyncio.Future | None = None

    async def __call__(self, req: BidRequest, limits: BidLimits, history: History) -> Bid:
        key_list, args = bid_call(req, limits, history)
        try:
            reply = await self.pipe.execute("EVALSHA", self.lua.sha, len(key_list),
                                            *key_list, *args)
        except NoScriptError:
            if self._loading is None or self._loading.done():
                self._loading = asyncio.ensure_future(
                    self.pipe.execute("SCRIPT", "LOAD", self.lua.script))
            await asyncio.shield(self._loading)
            reply = await self.pipe.execute("EVALSHA", self.lua.sha, len(key_list),
                                            *key_list, *args)
        return parse_bid(req, reply)


async def bid(redis: Any, req: BidRequest, limits: BidLimits, history: History) -> Bid:
    """One bid without a pipeline (tests, tools)."""
    key_list, args = bid_call(req, limits, history)
    return parse_bid(req, await _script("bid")(keys=key_list, args=args, client=redis))


# -- reading ---------------------------------------------------------------------------

_INTS = ("auction_id", "drop_id", "product_id", "start", "reserve", "duration_ms",
         "snipe_ms", "started_at", "ends_at", "first_ends_at", "seq", "amount",
         "closed_at", "hold_expires_at", "offer_amount", "offer_buyer_number",
         "offer_expires_at")


async def read(redis: Any, drop_id: int, auction_id: int) -> dict[str, Any] | None:
    """The auction's hash (ints as ints), or None."""
    raw = await redis.hgetall(auction_key(drop_id, auction_id))
    if not raw:
        return None
    out: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
    for name in _INTS:
        if out.get(name, "") != "":
            out[name] = int(out[name])
    return out


async def read_bids(redis: Any, drop_id: int, auction_id: int, after_seq: int = 0,
                    count: int = 1000) -> list[dict[str, Any]]:
    """Accepted bids after ``after_seq`` in seq order, as ``auction_bids`` rows."""
    entries = await redis.xrange(bids_key(drop_id, auction_id), f"({after_seq}-1", "+",
                                 count=count)
    out = []
    for entry_id, fields in entries:
        f = {_s(k): _s(v) for k, v in fields.items()}
        out.append({"seq": int(_s(entry_id).split("-")[0]), "user_id": f["user_id"],
                    "display_name": f["name"], "amount": int(f["amount"]),
                    "at_ms": int(f["at"]), "ends_at_ms": int(f["ends_at"]),
                    "extended": f["extended"] == "1", "idempotency_key": f["idem"]})
    return out


# -- after a Redis loss ----------------------------------------------------------------

async def restore(redis: Any, row: dict[str, Any], bids: list[dict[str, Any]]) -> bool:
    """Put back a running auction Redis lost, from its ``auctions`` row and its
    recorded bids (:mod:`checkout.auction_store`); True when this call did. The clock
    is the one the last recorded bid left (or the first end), so an auction whose end
    passed meanwhile closes at once."""
    from checkout.auction_rules import bands_of

    d, a = int(row["drop_id"]), int(row["id"])
    last = bids[-1] if bids else None
    fields = {
        "auction_id": a, "drop_id": d, "product_id": row["product_id"],
        "currency": str(row["currency"]).strip(), "start": row["start_price"],
        "increments": encode_increments(bands_of(row["increments"])),
        "reserve": row["reserve_price"] or 0, "duration_ms": row["duration_ms"],
        "snipe_ms": row["snipe_window_ms"], "creator_id": row["creator_id"],
        "state": "running", "started_at": row["started_at_ms"],
        "first_ends_at": row["ends_at_ms"],
        "ends_at": last["ends_at_ms"] if last else row["ends_at_ms"],
        "seq": last["seq"] if last else 0, "amount": last["amount"] if last else 0,
        "leader": last["user_id"] if last else "",
        "leader_name": last["display_name"] if last else "", "restored": 1}
    # Text, not numbers: Lua's numbers are doubles, and tostring() of a unix ms time
    # would write it in exponent form.
    packed = [[str(v) for v in (b["seq"], b["user_id"], b["display_name"], b["amount"],
                                b["at_ms"], b["ends_at_ms"], 1 if b["extended"] else 0,
                                b["idempotency_key"])] for b in bids]
    reply = await _script("auction_restore")(
        keys=[auction_key(d, a), bids_key(d, a)],
        args=[json.dumps({k: str(v) for k, v in fields.items()}), json.dumps(packed),
              KEEP_MS], client=redis)
    await redis.sadd(ACTIVE_AUCTIONS, member(d, a))
    return _s(reply[0]) == "ok"


# -- close -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Closed:
    """What the one call that closed an auction learnt."""

    drop_id: int
    auction_id: int
    product_id: int
    outcome: Outcome
    winner: str              # '' without bids
    winner_name: str
    amount: int              # the leading bid (0 without bids)
    seq: int                 # bids accepted
    closed_at: int
    hold_id: str = ""        # sold: the winner's hold
    buyer_number: int = 0
    expires_at: int = 0
    remaining: int = -1
    currency: str = ""
    flow: str = ""


async def close(redis: Any, drop_id: int, auction_id: int, *, hold_ttl_ms: int,
                history: History, flow_for: Any) -> Closed | None:
    """Close the auction if it is due and running: exactly one caller gets a
    :class:`Closed`; the others (and every call before the end) get None.

    ``flow_for(user_id)`` (async) names the payment flow of the winner's order:
    ``off_session`` when they have a saved card, else ``client_confirm``."""
    a = await read(redis, drop_id, auction_id)
    if a is None or a.get("state") != "running":
        return None
    for _ in range(3):
        leader = a.get("leader", "")
        flow = await flow_for(leader) if leader else "client_confirm"
        hold_id = keys.new_hold_id(drop_id, a["product_id"])
        d, p = drop_id, a["product_id"]
        reply = await _script("auction_close")(
            keys=[auction_key(d, auction_id), keys.product(d, p), keys.units(d, p),
                  keys.open_holds(d, p), keys.hold(d, hold_id), keys.expiry(d),
                  keys.orders(d), channels.meta_key(d), channels.history_key(d)],
            args=[hold_id, hold_ttl_ms, leader, flow, *history.args(d)], client=redis)
        status = _s(reply[0])
        if status == "retry":  # a bid came in between the read and the close
            a["leader"] = _s(reply[1])
            continue
        if status != "ok":
            return None
        return Closed(drop_id=d, auction_id=auction_id, product_id=p,
                      outcome=Outcome(_s(reply[1])), winner=_s(reply[2]),
                      amount=int(reply[3]), hold_id=_s(reply[4]),
                      buyer_number=int(reply[5]), expires_at=int(reply[6]),
                      remaining=int(reply[7]), closed_at=int(reply[8]), seq=int(reply[9]),
                      winner_name=_s(reply[10]), currency=a.get("currency", ""), flow=flow)
    return None


# -- second chance ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Offer:
    auction_id: int
    user_id: str
    name: str
    amount: int
    hold_id: str
    buyer_number: int
    expires_at: int
    flow: str
    replay: bool


async def runner_up(redis: Any, drop_id: int, auction_id: int, winner: str,
                    ) -> tuple[str, str, int] | None:
    """``(user, name, amount)`` of the highest bid by anyone but ``winner`` (bids
    ascend, so the newest such bid), or None."""
    last = "+"
    key = bids_key(drop_id, auction_id)
    while True:
        page = await redis.xrevrange(key, last, "-", count=200)
        for entry_id, fields in page:
            f = {_s(k): _s(v) for k, v in fields.items()}
            if f["user_id"] != winner:
                return f["user_id"], f["name"], int(f["amount"])
            last = f"({_s(entry_id)}"
        if len(page) < 200:
            return None


async def offer(redis: Any, drop_id: int, auction_id: int, *, hold_ttl_ms: int,
                flow_for: Any) -> Offer:
    """The second-chance offer to the runner-up, once (a repeat answers the first
    offer, ``replay``). Raises :class:`AuctionError`: ``auction_not_found``,
    ``not_sold``, ``winner_holds`` (the winner's hold is still held or paid),
    ``no_runner_up``, ``no_stock``."""
    a = await read(redis, drop_id, auction_id)
    if a is None:
        raise AuctionError("auction_not_found")
    runner = await runner_up(redis, drop_id, auction_id, a.get("leader", ""))
    user, name, amount = runner if runner else ("", "", 0)
    flow = await flow_for(user) if user else "client_confirm"
    d, p = drop_id, a["product_id"]
    hold_id = keys.new_hold_id(d, p)
    winner_hold = a.get("hold_id") or keys.new_hold_id(d, p)
    reply = await _script("auction_offer")(
        keys=[auction_key(d, auction_id), keys.product(d, p), keys.units(d, p),
              keys.open_holds(d, p), keys.hold(d, hold_id), keys.expiry(d), keys.orders(d),
              keys.hold(d, winner_hold)],
        args=[hold_id, hold_ttl_ms, user, name, amount, flow], client=redis)
    if _s(reply[0]) != "ok":
        raise AuctionError(_s(reply[1]), _s(reply[2]))
    return Offer(auction_id=auction_id, user_id=_s(reply[1]), name=_s(reply[2]),
                 amount=int(reply[3]), hold_id=_s(reply[4]), buyer_number=int(reply[5]),
                 expires_at=int(reply[6]), flow=flow, replay=bool(int(reply[7])))
