"""Drop chat: post, recent history, slow mode, pins, and moderation by the drop's staff.

* Posting needs a signed-in viewer; the text is trimmed, control characters other
  than newline are removed, and it must be 1..``DROPSERVER_CHAT_MAX_CHARS`` characters.
  The server never turns it into HTML: clients render it as text (textContent).
* ``scripts/chat_check.lua`` checks ban/mute, the per-user rate limit
  (``DROPSERVER_CHAT_RATE`` per 10 s per drop) and slow mode in one step.
* A message is a durable event ("chat.message"), so it has a position and is
  recovered like any other event; the last ``DROPSERVER_CHAT_HISTORY`` messages are
  also kept in a capped Redis list for the join snapshot, written by the same script
  that assigns the position (``scripts/history_add.lua``), so the snapshot lists
  them in offset order. Clients dedupe by ``id``.
* Mutes (one drop, for a while) and bans (every drop of the creator, until lifted)
  are rows in ``chat_moderation`` and cached in the drop's Redis hash. The hash
  carries a marker (the field ``""``, never a user id) once the drop's active rows
  have been read into it: a post that finds no marker (a new drop, Redis restarted)
  makes its process read them, once per drop however many sockets post meanwhile,
  and asks again. So a ban holds across reconnects and Redis restarts, and a chat
  storm costs PostgreSQL nothing: posting is two Redis scripts.
* The staff of a drop: its creator, admins, and the moderators the creator appointed
  (realtime.moderators, read from a per-process cache: never PostgreSQL per
  message). Staff delete, mute, ban, unban, pin and set slow mode; a moderator may not
  mute or ban the creator or another moderator. Every such action is a row of
  ``chat_moderation`` (the audit), and those viewers must see (a deleted or pinned
  message, slow mode) is a durable event of the drop.
* One message at a time is pinned (``chat.pin``): kept in Redis beside the recent
  list, shown in the join snapshot (``chat_pinned``), announced as ``chat.pinned`` /
  ``chat.unpinned``; deleting the pinned message unpins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack

from realtime import channels, metrics
from realtime._lua import load
from realtime.moderators import record
from realtime.protocol import ErrorCode, ProtocolError
from realtime.publish import publish

__all__ = ["active_moderation", "ban", "delete", "is_staff", "normalize", "pin", "post",
           "set_slow_mode", "unban", "unpin"]

_check = load("chat_check")

DEFAULT_MUTE_SECONDS = 600
RATE_WINDOW_MS = 10_000
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def normalize(text: str, max_chars: int) -> str:
    """The text as stored: trimmed, without control or bidi-override characters."""
    clean = _CONTROL.sub("", text).strip()
    if not clean:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "text is empty", details={"field": "text"})
    if len(clean) > max_chars:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"text longer than {max_chars} characters",
                            details={"field": "text", "max_chars": max_chars})
    return clean


def _require_user(conn: Any) -> str:
    if conn.principal is None or conn.principal.is_guest:
        raise ProtocolError(ErrorCode.TOKEN_MISSING, "sign in to chat")
    return conn.principal.user_id


async def is_staff(app: Any, conn: Any) -> bool:
    """The drop's creator, an admin, or one of the creator's moderators (from memory)."""
    who = conn.principal
    if who is None or who.is_guest:
        return False
    if who.can_manage(conn.creator_id or ""):
        return True
    return await app.state.moderators.is_moderator(conn.creator_id, who.user_id)


async def _require_staff(app: Any, conn: Any) -> str:
    user_id = _require_user(conn)
    if not await is_staff(app, conn):
        raise ProtocolError(ErrorCode.FORBIDDEN, "only the drop's creator, its moderators "
                            "or an admin may moderate this chat")
    return user_id


async def _require_target(app: Any, conn: Any, user_id: str) -> None:
    """A moderator mutes and bans viewers, not the creator nor another moderator."""
    if user_id == conn.creator_id or (
            not conn.principal.can_manage(conn.creator_id or "")
            and await app.state.moderators.is_moderator(conn.creator_id, user_id)):
        raise ProtocolError(ErrorCode.STAFF_TARGET, "the creator and moderators cannot be "
                            "muted or banned by a moderator", details={"user_id": user_id})


def _now_ms() -> int:
    return int(time.time() * 1000)


LOADED_FIELD = ""  # in the drop's "blocked" hash: its moderation rows are in it
_LOAD_TRIES = 3


async def _load_moderation(app: Any, drop_id: int, creator_id: str | None) -> None:
    """Copy the drop's active mutes and bans from PostgreSQL into its Redis hash, with
    the marker, in one write. One read per drop at a time in this process: the posts
    that find the marker missing meanwhile wait for the same read."""
    loads = getattr(app.state, "chat_moderation_loads", None)
    if loads is None:
        loads = app.state.chat_moderation_loads = {}
    task = loads.get(drop_id)
    if task is None:
        task = loads[drop_id] = asyncio.ensure_future(
            _read_moderation(app, drop_id, creator_id))
        task.add_done_callback(lambda _t: loads.pop(drop_id, None))
    await asyncio.shield(task)


async def active_moderation(db: Any, drop_id: int, creator_id: str | None) -> dict[str, str]:
    """The drop's active mutes and bans as its moderation hash keeps them: user ->
    ``"<mute|ban>:<until ms, 0: until lifted>"``, a ban before a mute."""
    rows = await db.fetch(
        """SELECT DISTINCT ON (user_id) user_id, action, expires_at FROM chat_moderation
           WHERE action IN ('mute', 'ban') AND lifted_at IS NULL
             AND (expires_at IS NULL OR expires_at > now())
             AND (drop_id = $1 OR (drop_id IS NULL AND (creator_id = $2 OR creator_id IS NULL)))
           ORDER BY user_id, action = 'ban' DESC, expires_at DESC NULLS FIRST""",
        drop_id, creator_id)
    return {r["user_id"]: r["action"] + ":" + ("0" if r["expires_at"] is None else
                                               str(int(r["expires_at"].timestamp() * 1000)))
            for r in rows}


async def _read_moderation(app: Any, drop_id: int, creator_id: str | None) -> None:
    entries = await active_moderation(app.state.db, drop_id, creator_id)
    entries[LOADED_FIELD] = "loaded"
    await app.state.redis.hset(channels.chat_key(drop_id, "blocked"), mapping=entries)


POST_SLOTS = 32  # chat posts of one process at Redis at once
POST_QUEUE = 256  # posts waiting for a slot; one more is refused (rate_limited)


class PostGate:
    """Bounds the chat posts one process works on at once. Each post is two Redis
    scripts on a connection of the process's pool; a worker that falls behind (a
    storm of posts on a busy or starved loop) had hundreds in flight, opened a
    connection for each until the pool's 512 were gone, then failed every Redis
    command of the process, the creator's among them (measured: 90 -> 633 Redis
    connections in 15 s of a 200 messages/s storm; the creator's go-live unanswered
    for 30 s). Here at most ``slots`` talk to Redis, ``queue`` more wait, and past
    that a post is refused at once with ``rate_limited`` (``retry_after_ms``): chat
    gives way, drop events and the creator's actions keep their connections."""

    def __init__(self, slots: int, queue: int) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._queue = queue
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self._queue:
            metrics.CHAT_REFUSED.inc()
            raise ProtocolError(ErrorCode.RATE_LIMITED, "chat is busy on this server; retry "
                                "shortly", details={"retry_after_ms": BUSY_RETRY_MS})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


BUSY_RETRY_MS = 1000


def _gate(app: Any) -> PostGate:
    gate = getattr(app.state, "chat_post_gate", None)
    if gate is None:
        gate = app.state.chat_post_gate = PostGate(POST_SLOTS, POST_QUEUE)
    return gate


async def post(app: Any, conn: Any, text: str) -> dict[str, Any]:
    """Post ``text`` as ``conn``'s user. The drop's creator and moderators skip the
    process's bound on posts in flight (:class:`PostGate`); viewers take a slot."""
    _require_user(conn)
    staff = await is_staff(app, conn)  # from memory: realtime.moderators
    if staff:
        return await _post(app, conn, text, staff)
    async with _gate(app).slot():
        return await _post(app, conn, text, staff)


async def _post(app: Any, conn: Any, text: str, exempt: bool) -> dict[str, Any]:
    settings = app.state.settings
    redis = app.state.redis
    user_id = _require_user(conn)
    clean = normalize(text, settings.chat_max_chars)
    drop_id = conn.drop_id
    keys = [channels.chat_key(drop_id, "blocked"), channels.chat_key(drop_id, f"rate:{user_id}"),
            channels.chat_key(drop_id, "slow"), channels.chat_key(drop_id, f"last:{user_id}")]
    for _ in range(_LOAD_TRIES):
        verdict, wait_ms = await _check(
            keys=keys, args=[user_id, _now_ms(), settings.chat_rate_per_10s, RATE_WINDOW_MS,
                             "1" if exempt else "0", LOADED_FIELD],
            client=redis)
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict != "unloaded":
            break
        await _load_moderation(app, drop_id, conn.creator_id)
    else:
        raise ProtocolError("unavailable", "chat moderation could not be read; retry shortly",
                            details={"retry_after_ms": 1000})
    if verdict == "ban":
        raise ProtocolError(ErrorCode.BANNED, "you are banned from this chat")
    if verdict == "mute":
        raise ProtocolError(ErrorCode.MUTED, "you are muted in this chat",
                            details={"retry_after_ms": int(wait_ms)})
    if verdict == "rate_limited":
        raise ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; slow down",
                            details={"retry_after_ms": max(int(wait_ms), 0)})
    if verdict == "slow_mode":
        raise ProtocolError(ErrorCode.SLOW_MODE, "slow mode is on",
                            details={"retry_after_ms": int(wait_ms)})
    message = {"id": secrets.token_hex(8), "user_id": user_id,
               "name": conn.principal.name or user_id, "text": clean, "at": _now_ms()}
    if exempt:  # always delivered, even where a big room's chat is sampled
        message["role"] = "creator" if user_id == conn.creator_id else "moderator"
    # One step: the offset, the history, the recent list and the fan-out, so the join
    # snapshot lists chat in the order live viewers got it.
    epoch, offset = await publish(
        redis, drop_id, "chat.message", message,
        recent=(channels.chat_key(drop_id, "recent"), settings.chat_history))
    metrics.CHAT_MESSAGES.inc()
    return {"message_id": message["id"], "pos": {"epoch": epoch, "offset": offset}}


async def _recent(redis: Any, drop_id: int, message_id: str) -> tuple[bytes, dict[str, Any]]:
    """A message of the recent list (raw and decoded), or ``message_not_found``."""
    for raw in await redis.lrange(channels.chat_key(drop_id, "recent"), 0, -1):
        try:
            message = msgpack.unpackb(raw, raw=False)
        except Exception:
            continue
        if isinstance(message, dict) and message.get("id") == message_id:
            return raw, message
    raise ProtocolError(ErrorCode.MESSAGE_NOT_FOUND, "no such recent message",
                        details={"message_id": message_id})


async def pinned(redis: Any, drop_id: int) -> dict[str, Any] | None:
    """The drop's pinned chat message, or None."""
    return channels.unpack_map(await redis.get(channels.chat_key(drop_id, "pinned")))


async def delete(app: Any, conn: Any, message_id: str) -> dict[str, Any]:
    moderator = await _require_staff(app, conn)
    redis = app.state.redis
    raw, message = await _recent(redis, conn.drop_id, message_id)
    await redis.lrem(channels.chat_key(conn.drop_id, "recent"), 0, raw)
    await record(app.state.db, action="delete", creator_id=conn.creator_id,
                 in_drop_id=conn.drop_id, drop_id=conn.drop_id, user_id=message["user_id"],
                 message_id=message_id, moderator_id=moderator)
    current = await pinned(redis, conn.drop_id)
    if current is not None and current.get("id") == message_id:
        await _unpin(app, conn, moderator, current)
    epoch, offset = await publish(redis, conn.drop_id, "chat.deleted", {"id": message_id})
    return {"deleted": message_id, "pos": {"epoch": epoch, "offset": offset}}


async def pin(app: Any, conn: Any, message_id: str) -> dict[str, Any]:
    """Pin a recent message (it replaces the one pinned before): ``chat.pinned``."""
    moderator = await _require_staff(app, conn)
    redis = app.state.redis
    _, message = await _recent(redis, conn.drop_id, message_id)
    shown = {**message, "pinned_by": moderator}
    await redis.set(channels.chat_key(conn.drop_id, "pinned"),
                    msgpack.packb(shown, use_bin_type=True), ex=app.state.settings.history_ttl)
    await record(app.state.db, action="pin", creator_id=conn.creator_id,
                 in_drop_id=conn.drop_id, user_id=message["user_id"], message_id=message_id,
                 moderator_id=moderator)
    epoch, offset = await publish(redis, conn.drop_id, "chat.pinned", shown)
    return {"pinned": message_id, "pos": {"epoch": epoch, "offset": offset}}


async def _unpin(app: Any, conn: Any, moderator: str,
                 current: dict[str, Any]) -> tuple[str, int]:
    await app.state.redis.delete(channels.chat_key(conn.drop_id, "pinned"))
    await record(app.state.db, action="unpin", creator_id=conn.creator_id,
                 in_drop_id=conn.drop_id, user_id=str(current.get("user_id", "")),
                 message_id=current.get("id"), moderator_id=moderator)
    return await publish(app.state.redis, conn.drop_id, "chat.unpinned",
                         {"id": current.get("id")})


async def unpin(app: Any, conn: Any) -> dict[str, Any]:
    """Unpin the pinned message (``chat.unpinned``); nothing pinned is not an error."""
    moderator = await _require_staff(app, conn)
    current = await pinned(app.state.redis, conn.drop_id)
    if current is None:
        return {"unpinned": None}
    epoch, offset = await _unpin(app, conn, moderator, current)
    return {"unpinned": current.get("id"), "pos": {"epoch": epoch, "offset": offset}}


async def _open_drops_of(app: Any, creator_id: str) -> list[int]:
    rows = await app.state.db.fetch(
        "SELECT id FROM drops WHERE creator_id = $1 AND state NOT IN ('ended', 'settled')",
        creator_id)
    return [r["id"] for r in rows]


async def moderate(app: Any, conn: Any, action: str, user_id: str, seconds: int | None,
                   reason: str) -> dict[str, Any]:
    """Mute (this drop; default 10 minutes) or ban (all drops of the creator)."""
    moderator = await _require_staff(app, conn)
    await _require_target(app, conn, user_id)
    if action == "mute":
        seconds = seconds or DEFAULT_MUTE_SECONDS
    until_ms = 0 if seconds is None else _now_ms() + seconds * 1000
    db = app.state.db
    expires_in = None if seconds is None else float(seconds)
    if action == "mute":
        await record(db, action="mute", creator_id=None, drop_id=conn.drop_id,
                     in_drop_id=conn.drop_id, user_id=user_id, reason=reason,
                     moderator_id=moderator, expires_in=expires_in)
        drops = [conn.drop_id]
    else:
        await record(db, action="ban", creator_id=conn.creator_id, in_drop_id=conn.drop_id,
                     user_id=user_id, reason=reason, moderator_id=moderator,
                     expires_in=expires_in)
        drops = sorted(set(await _open_drops_of(app, conn.creator_id)) | {conn.drop_id})
    redis = app.state.redis
    for drop_id in drops:
        await redis.hset(channels.chat_key(drop_id, "blocked"), user_id, f"{action}:{until_ms}")
    return {"user_id": user_id, "action": action,
            "until_ms": None if until_ms == 0 else until_ms}


async def unban(app: Any, conn: Any, user_id: str) -> dict[str, Any]:
    """Lift the user's mutes in this drop and bans by this drop's creator."""
    moderator = await _require_staff(app, conn)
    result = await app.state.db.execute(
        """UPDATE chat_moderation SET lifted_at = now()
           WHERE user_id = $1 AND action IN ('mute', 'ban') AND lifted_at IS NULL
             AND (drop_id = $2 OR creator_id = $3)""",
        user_id, conn.drop_id, conn.creator_id)
    await record(app.state.db, action="unban", creator_id=conn.creator_id,
                 in_drop_id=conn.drop_id, user_id=user_id, moderator_id=moderator)
    drops = sorted(set(await _open_drops_of(app, conn.creator_id)) | {conn.drop_id})
    for drop_id in drops:
        await app.state.redis.hdel(channels.chat_key(drop_id, "blocked"), user_id)
    return {"user_id": user_id, "lifted": int(result.split()[-1])}


async def set_slow_mode(app: Any, conn: Any, seconds: int) -> dict[str, Any]:
    moderator = await _require_staff(app, conn)
    redis = app.state.redis
    key = channels.chat_key(conn.drop_id, "slow")
    if seconds > 0:
        await redis.set(key, seconds, ex=app.state.settings.history_ttl)
    else:
        await redis.delete(key)
    await record(app.state.db, action="slow", creator_id=conn.creator_id,
                 in_drop_id=conn.drop_id, user_id="", moderator_id=moderator, seconds=seconds)
    epoch, offset = await publish(redis, conn.drop_id, "chat.slow", {"seconds": seconds})
    return {"seconds": seconds, "pos": {"epoch": epoch, "offset": offset}}


ban = moderate
