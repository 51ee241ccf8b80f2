"""Giveaways in PostgreSQL and Redis: open, enter, close and draw, award, announce.

PostgreSQL keeps each giveaway (``giveaways``: its commitment and secret seed), and at
the draw its entrants and winners (``giveaway_entrants``, ``giveaway_winners``). While
it is open, entries live in Redis under the drop's hash tag (one Redis Cluster slot):

    {drop:D}:gw:G     HASH  state (open, closed), opened_at, closes_at, closed_at (ms,
                            Redis' clock), creator, entries (distinct entrants)
    {drop:D}:gw:G:in  HASH  user id -> display name, one field per entrant

An entry is one script call (``scripts/giveaway_enter.lua``); the process that took it
also journals the entrant to PostgreSQL off the hot path, so a Redis that restarts
empty loses at most the last fraction of a second of entries: the next entry puts the
giveaway back from PostgreSQL (``scripts/giveaway_restore.lua``), and the draw takes
the journal's entrants with Redis'. The draw happens once:
every process's closer looks for giveaways past their window; the one that takes the
row lock (``FOR UPDATE SKIP LOCKED``) closes the window in Redis
(``giveaway_close.lua``: by Redis' clock, the one entries are judged by, so nothing
enters after the close), draws (:func:`drops.giveaway.draw`) and records the entrants
and winners in the same transaction. Then the prizes are awarded (zero-price orders,
:mod:`checkout.prizes`) and ``giveaway.drawn`` published to every viewer, and
``giveaway.won`` to each winner, once (``announced_at``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from checkout import prizes
from drops import giveaway
from drops.giveaway import GiveawayState, Refusal
from drops.scripts import load
from dropserver.errors import ApiError

__all__ = [
    "Audit",
    "Call",
    "DrawResult",
    "GiveawayRefused",
    "Meta",
    "announce",
    "audit",
    "close_and_draw",
    "drawn_event",
    "entrants",
    "entrants_key",
    "entries",
    "gw_key",
    "journal_entrants",
    "list_giveaways",
    "load_giveaway",
    "open_in_redis",
    "pending",
    "recent_wins",
    "redis_now_ms",
    "restore_in_redis",
    "try_enter",
    "winners",
    "won_event",
]

log = logging.getLogger("dropserver.giveaways")

_open = load("giveaway_open")
_enter = load("giveaway_enter")
_close = load("giveaway_close")
_restore = load("giveaway_restore")

KEEP_MS = 7 * 24 * 3600 * 1000  # Redis keeps a giveaway's keys this long after its close

COLUMNS = ("id, drop_id, creator_id, product_id, prize, winners, must_be_present, "
           "must_have_bought, state, commitment, seed, opened_at_ms, closes_at_ms, "
           "drawn_at_ms, entrants, announced_at")

_STATUS = {Refusal.NOT_FOUND: 404, Refusal.CLOSED: 409, Refusal.NOT_PRESENT: 403,
           Refusal.NOT_BOUGHT: 403, Refusal.NOT_ELIGIBLE: 403}


class GiveawayRefused(ApiError):
    """An entry refused, with its :class:`drops.giveaway.Refusal` code."""

    def __init__(self, refusal: Refusal, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=refusal.value, status=_STATUS[refusal],
                         details=details)
        self.refusal = refusal


def gw_key(drop_id: int, giveaway_id: int) -> str:
    return f"{{drop:{int(drop_id)}}}:gw:{int(giveaway_id)}"


def entrants_key(drop_id: int, giveaway_id: int) -> str:
    return f"{gw_key(drop_id, giveaway_id)}:in"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def redis_now_ms(redis: Any) -> int:
    """Redis' clock (``TIME``), the clock every window is judged by."""
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


# -- reading --------------------------------------------------------------------------

async def load_giveaway(db: Any, drop_id: int, giveaway_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(f"SELECT {COLUMNS} FROM giveaways WHERE id = $1 AND drop_id = $2",
                            giveaway_id, drop_id)
    return dict(row) if row is not None else None


async def list_giveaways(db: Any, drop_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {COLUMNS} FROM giveaways WHERE drop_id = $1 ORDER BY id",
                          drop_id)
    return [dict(r) for r in rows]


async def winners(db: Any, giveaway_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT rank, user_id, ticket, display_name, order_id, prize_error "
        "FROM giveaway_winners WHERE giveaway_id = $1 ORDER BY rank", giveaway_id)
    return [dict(r) for r in rows]


async def entrants(db: Any, giveaway_id: int) -> list[str]:
    """The drawn giveaway's tickets, sorted (what the draw shuffled)."""
    rows = await db.fetch("SELECT ticket FROM giveaway_entrants WHERE giveaway_id = $1 "
                          "ORDER BY ticket COLLATE \"C\"", giveaway_id)
    return [r["ticket"] for r in rows]


async def entries(redis: Any, drop_id: int, giveaway_id: int) -> int:
    """Distinct entrants so far (Redis' count while open)."""
    value = await redis.hget(gw_key(drop_id, giveaway_id), "entries")
    return int(value) if value is not None else 0


# -- open -------------------------------------------------------------------------------

async def open_in_redis(redis: Any, row: dict[str, Any]) -> None:
    """The giveaway's window in Redis (idempotent)."""
    await _open(keys=[gw_key(row["drop_id"], row["id"])],
                args=[row["opened_at_ms"], row["closes_at_ms"], row["creator_id"], KEEP_MS],
                client=redis)


async def restore_in_redis(db: Any, redis: Any, drop_id: int, giveaway_id: int,
                           ) -> str | None:
    """Redis lost an open giveaway (it restarted empty): put back its window and the
    entrants journaled in PostgreSQL (``giveaway_restore.lua``). Returns the state
    PostgreSQL has (``open``: restored; ``drawn``: nothing to restore), or None."""
    row = await load_giveaway(db, drop_id, giveaway_id)
    if row is None or row["state"] != GiveawayState.OPEN:
        return row["state"] if row is not None else None
    people = await db.fetch("SELECT user_id, display_name FROM giveaway_entrants "
                            "WHERE giveaway_id = $1", giveaway_id)
    args: list[Any] = [row["opened_at_ms"], row["closes_at_ms"], row["creator_id"], KEEP_MS]
    for p in people:
        args += [p["user_id"], p["display_name"]]
    count = await _restore(keys=[gw_key(drop_id, giveaway_id),
                                 entrants_key(drop_id, giveaway_id)], args=args, client=redis)
    log.warning("giveaway restored in Redis from PostgreSQL",
                extra={"drop_id": drop_id, "giveaway_id": giveaway_id,
                       "journaled": len(people), "entrants": int(count)})
    return GiveawayState.OPEN.value


async def journal_entrants(db: Any, rows: list[tuple[int, str, str, str]]) -> None:
    """Entrants as the processes that took them record them: ``(giveaway id, user
    id, ticket, display name)``, once each (``ON CONFLICT DO NOTHING``). Rows go in
    (giveaway, user) order: the draw's transaction and the entry journals write rows
    of the same giveaway at once, and two inserts taking each other's keys in opposite
    orders deadlock."""
    if not rows:
        return
    cols = list(zip(*sorted(rows, key=lambda r: (r[0], r[1])), strict=True))
    await db.execute(
        """INSERT INTO giveaway_entrants (giveaway_id, user_id, ticket, display_name)
           SELECT g, usr, t, d
           FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
                WITH ORDINALITY AS u(g, usr, t, d, n) ORDER BY n
           ON CONFLICT DO NOTHING""", *[list(c) for c in cols])


# -- enter ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Meta:
    """What an entry needs to know of its giveaway (fixed when it opens: cached)."""

    giveaway_id: int
    drop_id: int
    creator_id: str
    product_id: int | None
    must_be_present: bool
    must_have_bought: bool
    seed: bytes  # for the journal's tickets; never leaves the process before the draw


async def try_enter(call: Any, drop_id: int, giveaway_id: int, user_id: str,
                    name: str) -> tuple[bool, int]:
    """One entry through ``call(keys, args)`` (an auto-pipelined EVALSHA of
    ``giveaway_enter.lua``); returns (new entrant?, distinct entrants) or raises
    :class:`GiveawayRefused`."""
    reply = await call([gw_key(drop_id, giveaway_id), entrants_key(drop_id, giveaway_id)],
                       [user_id, name])
    if _s(reply[0]) == "ok":
        return bool(int(reply[1])), int(reply[2])
    code, detail = _s(reply[1]), _s(reply[2])
    if code == Refusal.CLOSED:
        raise GiveawayRefused(Refusal.CLOSED, "the giveaway's entry window has ended",
                              {"closes_at": int(detail)} if detail.isdigit() else None)
    if code == Refusal.NOT_ELIGIBLE:
        raise GiveawayRefused(Refusal.NOT_ELIGIBLE, "the drop's creator cannot enter")
    raise GiveawayRefused(Refusal.NOT_FOUND, "no such giveaway in this drop")


# -- the draw ---------------------------------------------------------------------------

# How the closer runs a script: ``call(script, keys, args)`` (a ClusterAwareScript or
# redis-py's AsyncScript) -> its reply.
Call = Callable[[Any, list[str], list[Any]], Awaitable[Any]]


async def _run(call: Call | None, redis: Any, script: Any, key_list: list[str],
               args: list[Any]) -> Any:
    if call is not None:
        return await call(script, key_list, args)
    return await script(keys=key_list, args=args, client=redis)


@dataclass(frozen=True, slots=True)
class DrawResult:
    giveaway_id: int
    drop_id: int
    entrants: int
    winners: list[str]  # tickets, rank order


async def pending(db: Any) -> list[tuple[int, int, str, int]]:
    """``(giveaway id, drop id, state, closes_at_ms)`` of every giveaway still open and
    every one drawn but not announced, earliest close first: what is due now and when
    the next is (one query for both: the closer sleeps until then)."""
    rows = await db.fetch(
        "SELECT id, drop_id, state, closes_at_ms FROM giveaways "
        "WHERE state = 'open' OR (state = 'drawn' AND announced_at IS NULL) "
        "ORDER BY closes_at_ms LIMIT 50")
    return [(r["id"], r["drop_id"], r["state"], r["closes_at_ms"]) for r in rows]


async def _lock(conn: asyncpg.Connection, giveaway_id: int,
                condition: str) -> asyncpg.Record | None:
    """The giveaway's row, locked for this transaction, if ``condition`` holds and no
    other process holds it (then None: that process is doing the same work)."""
    return await conn.fetchrow(
        f"SELECT {COLUMNS} FROM giveaways WHERE id = $1 AND {condition} "
        "FOR UPDATE SKIP LOCKED", giveaway_id)


async def close_and_draw(db: asyncpg.Pool, redis: Any, giveaway_id: int, *,
                         call: Call | None = None) -> DrawResult | None:
    """Close the window and draw, if this process is the one to (see the module
    docstring). None when another process has it, it was drawn, or its window has
    not ended by Redis' clock.

    ``call(script, keys, args)`` runs ``giveaway_close.lua`` (default: on ``redis``).
    The closer's runs it on the buy path's pipeline, whose ``WAIT`` answers only once
    a replica has the close and every entry before it (see "In a Redis failover" in
    docs/topics/giveaways.md); until then it raises
    :class:`~checkout.redis_pipe.NotReplicated` and nothing is drawn."""
    async with db.acquire() as conn, conn.transaction():
        row = await _lock(conn, giveaway_id, "state = 'open'")
        if row is None:
            return None
        drop_id = row["drop_id"]
        reply = await _run(call, redis, _close, [gw_key(drop_id, giveaway_id),
                                                 entrants_key(drop_id, giveaway_id)], [])
        outcome = _s(reply[0])
        if outcome == "not_yet":
            return None
        names: dict[str, str] = {}
        if outcome == "not_found":
            # Redis lost the giveaway (restarted empty) and no entry came since to
            # restore it: the entrants are those journaled in PostgreSQL.
            log.error("giveaway missing in Redis at its draw: drawn from the journal",
                      extra={"drop_id": drop_id, "giveaway_id": giveaway_id})
            closed_at = row["closes_at_ms"]
        else:
            closed_at = int(reply[1])
            items = [_s(x) for x in reply[2:]]
            names = dict(zip(items[0::2], items[1::2], strict=True))
        for p in await conn.fetch("SELECT user_id, display_name FROM giveaway_entrants "
                                  "WHERE giveaway_id = $1", giveaway_id):
            names.setdefault(p["user_id"], p["display_name"])
        seed = bytes.fromhex(row["seed"])
        by_ticket = {giveaway.ticket(seed, user): user for user in names}
        drawn = giveaway.draw(seed, by_ticket, row["winners"])
        await journal_entrants(conn, [(giveaway_id, user, t, names[user])
                                      for t, user in by_ticket.items()])
        await conn.executemany(
            "INSERT INTO giveaway_winners (giveaway_id, rank, user_id, ticket, display_name)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(giveaway_id, rank, by_ticket[t], t, names[by_ticket[t]])
             for rank, t in enumerate(drawn, 1)])
        await conn.execute(
            "UPDATE giveaways SET state = $2, drawn_at_ms = $3, entrants = $4 WHERE id = $1",
            giveaway_id, GiveawayState.DRAWN.value, closed_at, len(by_ticket))
    log.info("giveaway drawn", extra={"drop_id": drop_id, "giveaway_id": giveaway_id,
                                      "entrants": len(by_ticket), "winners": len(drawn)})
    return DrawResult(giveaway_id, drop_id, len(by_ticket), drawn)


async def announce(db: asyncpg.Pool, redis: Any, giveaway_id: int, *,
                   publish: Any, tell: Any, on_award: Any = None,
                   load_drop: Any = None, call: Call | None = None) -> bool:
    """Award the prizes and publish the result, once: under the row lock, the prize
    orders are made (idempotent), ``publish(drop_id, event, data)`` sends
    ``giveaway.drawn`` and ``tell(user_id, event, data)`` each ``giveaway.won``, and
    ``announced_at`` is set. True when this call announced.

    ``on_award(drop_id, product_id, award)`` follows each prize awarded, a replay too
    (stock, sold out); ``load_drop(drop_id)`` is awaited when the drop is not loaded in
    Redis (a Redis loss) before trying again: it answers ``checkout.recovery.ensure_loaded``'s
    ``"loaded"``, ``"not_live"`` (the drop is off air in PostgreSQL: the winner wins
    without a unit, ``prize_error`` ``not_on_sale``) or ``"busy"`` (503: the next
    round tries again).

    ``call``: as :func:`close_and_draw`'s, for ``award.lua``: a prize hold no replica
    has is neither recorded nor announced (a lagging failover would lose it, and its
    winner would be told of an order that never comes)."""
    def run(lua: Any, key_list: list[str], args: list[Any]) -> Any:
        return _run(call, redis, lua, key_list, args)

    async with db.acquire() as conn, conn.transaction():
        row = await _lock(conn, giveaway_id, "state = 'drawn' AND announced_at IS NULL")
        if row is None:
            return False
        drop_id, product_id = row["drop_id"], row["product_id"]
        won = await winners(conn, giveaway_id)
        for w in won:
            if product_id is None or w["order_id"] is not None or w["prize_error"]:
                continue
            result = await prizes.award(run, drop_id, product_id, w["user_id"],
                                        giveaway_id, w["rank"])
            if result.error == "not_ready":
                outcome = await load_drop(drop_id) if load_drop is not None else "busy"
                if outcome == "loaded":
                    result = await prizes.award(run, drop_id, product_id, w["user_id"],
                                                giveaway_id, w["rank"])
                elif outcome == "not_live":
                    result = prizes.Award(None, error="not_on_sale")
            if result.hold_id is None and result.error == "not_ready":
                raise ApiError("the drop is not loaded in Redis", code="not_ready",
                               status=503)
            w["order_id"], w["prize_error"] = result.hold_id, result.error or None
            await conn.execute(
                "UPDATE giveaway_winners SET order_id = $3, prize_error = $4 "
                "WHERE giveaway_id = $1 AND rank = $2",
                giveaway_id, w["rank"], w["order_id"], w["prize_error"])
            # A replay too: an announcement rolled back after its award (a replica
            # that lagged, a crash) may not have said it (on_award is idempotent).
            if on_award is not None and result.hold_id is not None:
                await on_award(drop_id, product_id, result)
        await publish(drop_id, "giveaway.drawn", drawn_event(row, won))
        for w in won:
            await tell(w["user_id"], "giveaway.won", won_event(row, w))
        await conn.execute("UPDATE giveaways SET announced_at = now() WHERE id = $1",
                           giveaway_id)
    return True


def won_event(row: dict[str, Any] | asyncpg.Record,
              w: dict[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """``giveaway.won``, the winner's private event (docs/protocol.md)."""
    return {"giveaway_id": row["id"], "drop_id": row["drop_id"], "rank": w["rank"],
            "prize": row["prize"], "product_id": row["product_id"], "ticket": w["ticket"],
            "order_id": w["order_id"], "prize_error": w["prize_error"]}


async def recent_wins(db: Any, user_ids: list[str], since: float,
                      ) -> list[tuple[str, dict[str, Any], float]]:
    """``(user id, giveaway.won data, announced at)`` of these users' wins announced
    since ``since`` (Unix seconds): what a socket that missed the event is sent."""
    rows = await db.fetch(
        """SELECT g.id, g.drop_id, g.prize, g.product_id, w.user_id, w.rank, w.ticket,
                  w.order_id, w.prize_error,
                  extract(epoch FROM g.announced_at)::float8 AS announced
           FROM giveaway_winners w JOIN giveaways g ON g.id = w.giveaway_id
           WHERE w.user_id = ANY($1::text[]) AND g.announced_at >= to_timestamp($2)
           ORDER BY g.announced_at LIMIT 1000""", list(user_ids), since)
    return [(r["user_id"], won_event(r, r), r["announced"]) for r in rows]


def drawn_event(row: dict[str, Any] | asyncpg.Record, won: list[dict[str, Any]],
                ) -> dict[str, Any]:
    """``giveaway.drawn``: the seed, the entrant count and the winners (docs/protocol.md)."""
    return {
        "giveaway_id": row["id"], "drop_id": row["drop_id"], "prize": row["prize"],
        "product_id": row["product_id"], "commitment": row["commitment"],
        "seed": row["seed"], "entrants": row["entrants"], "drawn_at": row["drawn_at_ms"],
        "winners": [{"rank": w["rank"], "ticket": w["ticket"], "name": w["display_name"]}
                    for w in won],
        "entrants_url": f"/v1/drops/{row['drop_id']}/giveaways/{row['id']}/entrants",
    }


# -- the audit ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Audit:
    """A drawn giveaway recomputed from PostgreSQL alone (:func:`audit`)."""

    ok: bool
    problems: list[str]
    winners: list[str]  # the winning tickets the recomputation gives, rank order


async def audit(db: Any, giveaway_id: int) -> Audit:
    """Recompute a drawn giveaway from its rows: the seed matches the commitment, every
    entrant's ticket is ``HMAC(seed, user id)``, the recorded winners are what the draw
    gives over those tickets (with the right user ids), and each product prize is a
    paid zero-price order of its winner (the order worker records it shortly after
    the announcement: audit once the drop's order stream is quiet)."""
    row = await db.fetchrow(f"SELECT {COLUMNS} FROM giveaways WHERE id = $1", giveaway_id)
    if row is None or row["state"] != GiveawayState.DRAWN:
        return Audit(False, [f"giveaway {giveaway_id} is not drawn"], [])
    problems: list[str] = []
    seed = bytes.fromhex(row["seed"])
    if giveaway.commitment(seed) != row["commitment"]:
        problems.append("the seed does not match the commitment")
    people = await db.fetch(
        "SELECT user_id, ticket FROM giveaway_entrants WHERE giveaway_id = $1", giveaway_id)
    by_ticket = {}
    for p in people:
        if giveaway.ticket(seed, p["user_id"]) != p["ticket"]:
            problems.append(f"entrant {p['user_id']}: the ticket is not HMAC(seed, id)")
        by_ticket[p["ticket"]] = p["user_id"]
    if row["entrants"] != len(people):
        problems.append(f"{row['entrants']} entrants announced, {len(people)} recorded")
    expected = giveaway.draw(seed, by_ticket, row["winners"])
    won = await winners(db, giveaway_id)
    if [w["ticket"] for w in won] != expected:
        problems.append(f"recorded winners {[w['ticket'] for w in won]}, "
                        f"the draw gives {expected}")
    for w in won:
        if by_ticket.get(w["ticket"]) != w["user_id"]:
            problems.append(f"rank {w['rank']}: user {w['user_id']} does not hold the "
                            "winning ticket")
        if row["product_id"] is None or w["prize_error"]:
            continue
        order = await db.fetchrow(
            "SELECT user_id, amount, state, product_id FROM orders WHERE public_id = $1",
            w["order_id"])
        if order is None or dict(order) != {"user_id": w["user_id"], "amount": 0,
                                            "state": "paid", "product_id": row["product_id"]}:
            problems.append(f"rank {w['rank']}: prize order {w['order_id']} is "
                            f"{dict(order) if order else None}")
    return Audit(not problems, problems, expected)
