"""Private events that a socket missed: recovered from the current state, heard once.

A user's channel (``order.*``) keeps no history, so a publication made while this
process's pub/sub connection was lost, or before a socket's user channel was
subscribed, reaches none of the user's sockets here. Instead of a per-user history,
the hub asks a :class:`PrivateSource` -- wired by each package that owns such events
(:meth:`Recovery.add_source`; checkout: the buyer's orders in PostgreSQL; drops: the
giveaways a user won; realtime never imports them) -- for the
*current* event of each thing the user's sockets may have missed, and sends each
socket the ones it has not heard:

* after the subscriber reconnects (every signed-in user of the process), and
* after a user's channel is subscribed for their first socket here (that user).

Each event is about a *topic* (an order) at a *rank* (how far along it is: ``held`` <
``payment`` < ``paid``/``failed``/... < ``refunded``, :meth:`PrivateSource.key`). A
socket remembers the highest rank it heard per topic (:class:`Heard`) and is sent an
event only above it, live or recovered, so nothing is heard twice and a recovered
state is never followed by an older live one. A socket is offered what changed since
it opened (a little before, for clocks): what happened before that, a client reads
over HTTP after it connects (docs/protocol.md). A user's new socket starts knowing
what their sockets closed in the last seconds heard (:meth:`Recovery.left`,
:meth:`Recovery.joined`; from another process through a short-lived Redis hash,
:func:`left_key`, read only when recovery has something to send), so a client that
reconnects is not told again, inside that margin, what its old socket heard.

Recovery is batched (one query for many users) and retried while the source fails
(PostgreSQL down): users whose sockets are gone are dropped from the batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["CLOCK_SLACK_S", "LEFT_KEEP_S", "Current", "Heard", "PrivateSource", "Recovery",
           "Sources"]

log = logging.getLogger("dropserver.realtime")

CLOCK_SLACK_S = 1.0  # a socket is offered what changed from this long before it opened
LEFT_KEEP_S = CLOCK_SLACK_S + 4.0  # what a user's closed socket heard, kept for the next
LEFT_USERS = 10_000  # users whose closed sockets' ranks are kept (oldest forgotten)
CLOSED_AT = "_closed_at"  # the field of left_key's hash that says when (wall clock)


def left_key(user_id: str) -> str:
    """The Redis hash of what a user's sockets closed lately heard (topic -> rank),
    on the user's slot, for the user's next socket on another process."""
    return f"{{user:{user_id}}}:heard"
HEARD_TOPICS = 256   # topics a socket remembers (its user's recent orders)
BATCH = 500          # users per source query
BATCH_DELAY_S = 0.05  # users gathered before a query


@dataclass(frozen=True, slots=True)
class Current:
    """The current event of one topic of a user, and when it changed (Unix seconds)."""

    user_id: str
    event: str
    data: dict[str, Any]
    changed_at: float


class PrivateSource(Protocol):
    def key(self, event: str, data: dict[str, Any]) -> tuple[str, int] | None:
        """``(topic, rank)`` of a private event, or None for one that is not recoverable
        (it is then always delivered)."""

    async def current(self, user_ids: Sequence[str], since: float) -> list[Current]:
        """The current event of each topic of these users that changed since ``since``."""


class Sources:
    """Several packages' sources as one (checkout's orders, drops' giveaway wins): an
    event's key is the first source's that knows it; recovery asks each."""

    def __init__(self, *sources: PrivateSource) -> None:
        self.sources = list(sources)

    def key(self, event: str, data: dict[str, Any]) -> tuple[str, int] | None:
        for source in self.sources:
            key = source.key(event, data)
            if key is not None:
                return key
        return None

    async def current(self, user_ids: Sequence[str], since: float) -> list[Current]:
        found: list[Current] = []
        for source in self.sources:
            found += await source.current(user_ids, since)
        return found


class Heard:
    """What one socket heard: the highest rank per topic (bounded; oldest forgotten)."""

    __slots__ = ("last", "ranks")

    def __init__(self) -> None:
        self.ranks: dict[str, int] = {}
        self.last = 0.0  # monotonic: when it last heard something new

    def merge(self, other: Heard) -> None:
        """Also remember what ``other`` heard (the higher rank of each topic)."""
        for topic, rank in other.ranks.items():
            self.fresh(topic, rank)

    def copy(self) -> Heard:
        heard = Heard()
        heard.ranks, heard.last = dict(self.ranks), self.last
        return heard

    def fresh(self, topic: str, rank: int) -> bool:
        """Whether an event at ``rank`` is news to this socket; remembers it if so."""
        ranks = self.ranks
        if ranks.get(topic, -1) >= rank:
            return False
        ranks.pop(topic, None)
        ranks[topic] = rank
        self.last = time.monotonic()
        if len(ranks) > HEARD_TOPICS:
            del ranks[next(iter(ranks))]
        return True


class Recovery:
    """Batched recovery for a hub: ``request(users)``; see the module docstring."""

    def __init__(self, sockets_of: Callable[[str], Iterable[Any]],
                 deliver: Callable[[Any, str, dict[str, Any]], None],
                 redis: Any = None) -> None:
        self.source: PrivateSource | None = None
        self.redis = redis  # where closed sockets' ranks are shared with other processes
        self._sockets_of = sockets_of
        self._deliver = deliver
        self._wanted: set[str] = set()
        self._task: asyncio.Task | None = None
        # user -> (until, what their closed sockets heard): a reconnecting client's
        # new socket starts from it (see :meth:`left`)
        self._left: dict[str, tuple[float, Heard]] = {}
        self._sharing: set[asyncio.Task] = set()
        self.recovered = 0  # events sent by recovery (tests, logs)

    def add_source(self, source: PrivateSource) -> None:
        """A package's source of the private events it owns (see :class:`Sources`)."""
        if self.source is None:
            self.source = source
        elif isinstance(self.source, Sources):
            self.source.sources.append(source)
        else:
            self.source = Sources(self.source, source)

    def fresh(self, conn: Any, event: str, data: dict[str, Any]) -> bool:
        """Whether a live private event is news to ``conn`` (and remember it)."""
        source = self.source
        key = source.key(event, data) if source is not None else None
        if key is None:
            return True
        heard = conn.heard_private
        if heard is None:
            heard = conn.heard_private = Heard()
        return heard.fresh(*key)

    def left(self, user_id: str, conn: Any) -> None:
        """``conn`` no longer gets ``user_id``'s private events (closed, signed out):
        what it heard is kept a few seconds for the user's next socket here."""
        heard = conn.heard_private
        if heard is None or not heard.ranks:
            return
        now = time.monotonic()
        kept = self._left.pop(user_id, None)
        if kept is not None and kept[0] > now:
            heard = kept[1].copy()
            heard.merge(conn.heard_private)
        self._left[user_id] = (now + LEFT_KEEP_S, heard.copy())
        while len(self._left) > LEFT_USERS:
            del self._left[next(iter(self._left))]
        if self.redis is not None and conn.heard_private.last > now - LEFT_KEEP_S:
            # It heard something lately: its client may reconnect to another process.
            task = asyncio.get_running_loop().create_task(
                self._share(user_id, heard.copy()), name="private-left")
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)

    async def _share(self, user_id: str, heard: Heard) -> None:
        key = left_key(user_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping={CLOSED_AT: repr(time.time()), **heard.ranks})
                pipe.expire(key, math.ceil(LEFT_KEEP_S))
                await pipe.execute()
        except Exception as exc:  # a repeat on another process, at worst
            log.warning("closed socket's private ranks not shared",
                        extra={"user_id": user_id, "error": str(exc)[:200]})

    async def _heard_elsewhere(self, users: Iterable[str]) -> dict[str, tuple[float, Heard]]:
        """What the users' sockets closed lately on any process heard, and when the
        last of them closed (wall clock), from Redis."""
        users = list(users)
        if self.redis is None or not users:
            return {}
        try:
            found = await asyncio.gather(*(self.redis.hgetall(left_key(u)) for u in users))
        except Exception as exc:
            log.warning("closed sockets' private ranks not read",
                        extra={"users": len(users), "error": str(exc)[:200]})
            return {}
        out: dict[str, tuple[float, Heard]] = {}
        for user_id, fields in zip(users, found, strict=True):
            if not fields:
                continue
            heard, closed_at = Heard(), 0.0
            for name, value in fields.items():
                name = name.decode() if isinstance(name, bytes) else name
                value = value.decode() if isinstance(value, bytes) else value
                if name == CLOSED_AT:
                    closed_at = float(value)
                else:
                    heard.ranks[name] = int(value)
            out[user_id] = (closed_at, heard)
        return out

    def joined(self, user_id: str, conn: Any) -> None:
        """``conn`` gets ``user_id``'s private events from now: it starts knowing what
        the user's sockets closed in the last seconds heard, so a client that
        reconnects is not sent again, on its new socket, what its old one heard (a new
        socket is offered what changed from ``CLOCK_SLACK_S`` before it opened)."""
        kept = self._left.get(user_id)
        if kept is None:
            return
        if kept[0] <= time.monotonic():
            del self._left[user_id]
            return
        if conn.heard_private is None:
            conn.heard_private = kept[1].copy()
        else:
            conn.heard_private.merge(kept[1])

    def request(self, user_ids: Iterable[str]) -> None:
        if self.source is None:
            return
        self._wanted.update(user_ids)
        if self._wanted and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="private-recovery")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        backoff = 0.1
        await asyncio.sleep(BATCH_DELAY_S)
        while self._wanted:
            users = [u for u in self._wanted if any(True for _ in self._sockets_of(u))]
            batch = users[:BATCH]
            self._wanted.difference_update(batch)
            self._wanted.intersection_update(users)  # users with no socket left: dropped
            if not batch:
                continue
            try:
                await self._recover(batch)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("private event recovery failed; retrying",
                            extra={"users": len(batch), "error": str(exc)[:200]})
                self._wanted.update(batch)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _recover(self, users: list[str]) -> None:
        source = self.source
        assert source is not None
        opened = [c.opened_at for u in users for c in self._sockets_of(u)]
        if not opened:
            return
        found = await source.current(users, min(opened) - CLOCK_SLACK_S)
        # A socket opened after another of its user's closed (a reconnect, maybe from
        # another process) starts from what that one heard.
        elsewhere = await self._heard_elsewhere({cur.user_id for cur in found})
        for user_id, (closed_at, heard_there) in elsewhere.items():
            for conn in self._sockets_of(user_id):
                if conn.opened_at >= closed_at:
                    if conn.heard_private is None:
                        conn.heard_private = Heard()
                    conn.heard_private.merge(heard_there)
        sent = self.recovered
        for cur in found:
            key = source.key(cur.event, cur.data)
            if key is None:
                continue
            for conn in list(self._sockets_of(cur.user_id)):
                if cur.changed_at < conn.opened_at - CLOCK_SLACK_S or conn.closed:
                    continue
                heard = conn.heard_private
                if heard is None:
                    heard = conn.heard_private = Heard()
                if heard.fresh(*key):
                    self.recovered += 1
                    self._deliver(conn, cur.event, cur.data)
        if self.recovered > sent:
            log.info("private events recovered", extra={
                "users": len(users), "events": self.recovered - sent})
