"""A socket's token over the socket's life: expiry and ``refresh``.

A token is checked when a socket joins; a socket can stay open for hours, longer than
its token. So, as Firebase does with an expired auth token, the socket loses what the
token gave it when the token expires and keeps the rest, and, as Centrifugo's
``refresh`` command does, the client can hand over a new token without reconnecting:

* at ``exp`` plus the leeway tokens get everywhere (:data:`LEEWAY_S`, as
  :class:`dropserver.auth.TokenVerifier`), the socket becomes a guest's: it keeps
  watching the drop (guests may), gets no more private events, and is told with a
  ``{"t": "token_expired"}`` frame. Chat and commands then answer ``token_expired``;
* ``{"t": "refresh", "token": "<jwt>"}`` with a valid token for the same user (before
  or after expiry) signs the socket in again until the new token's ``exp``: reply
  ``{"user_id", "expires_at"}``. Another user's token, or any token on a socket that
  joined as a guest, is ``token_user_mismatch`` (open another socket to switch users).

Nothing for guests; each signed-in socket sits in the process's :class:`TokenClock`
(one timer for all) until it closes or refreshes. docs/protocol.md, "Tokens on an open
socket".
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Any

from dropserver.auth import GUEST, Principal
from dropserver.errors import ApiError
from realtime.hub import Broadcast
from realtime.protocol import ErrorCode, ProtocolError, ServerType

__all__ = ["LEEWAY_S", "TokenClock", "TokenLife", "check", "forget", "refresh", "track"]

LEEWAY_S = 10  # dropserver.auth.TokenVerifier.verify's leeway
TOKEN_EXPIRED_FRAME = {"t": ServerType.TOKEN_EXPIRED.value}


class TokenLife:
    """Whose token a socket runs on, and the second its signed-in state ends."""

    __slots__ = ("conn", "due", "expired", "user_id")

    def __init__(self, conn: Any, user_id: str) -> None:
        self.conn: Any = conn  # None once the socket closed
        self.user_id = user_id
        self.expired = False
        self.due: int | None = None  # the TokenClock second it is filed under


class TokenClock:
    """The expiries of one process's sockets, filed by whole second, with one timer
    for all. A ``call_at`` handle per socket cost ~480 bytes a signed-in viewer (a
    viewer costs ~20 KiB, docs/topics/realtime.md); this costs a :class:`TokenLife`
    and a list slot, ~110 bytes at 50,000 sockets. Expiry is at most a second late. A
    socket that closes or refreshes is not taken out of its list (it is skipped when
    the second comes); a closed one leaves only its small TokenLife there until then."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._due: dict[int, list[TokenLife]] = {}
        self._seconds: list[int] = []  # heap of the lists' seconds
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: int | None = None

    def add(self, life: TokenLife, at: float) -> None:
        second = math.ceil(at)
        filed = self._due.get(second)
        if filed is None:
            filed = self._due[second] = []
            heapq.heappush(self._seconds, second)
        filed.append(life)
        life.due = second
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._seconds.clear()

    def _arm(self) -> None:
        if not self._seconds:
            return
        first = self._seconds[0]
        if self._timer is not None and self._armed_for is not None \
                and self._armed_for <= first:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._armed_for = first
        self._timer = loop.call_at(loop.time() + max(0.0, first - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = self._armed_for = None
        now = time.time()
        while self._seconds and self._seconds[0] <= now:
            second = heapq.heappop(self._seconds)
            for life in self._due.pop(second, ()):
                if life.due == second and life.conn is not None:  # not moved, not closed
                    _expire(self.hub, life)
        self._arm()


def _expires_at(who: Principal) -> float | None:
    exp = (who.claims or {}).get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) \
        else None


def track(hub: Any, conn: Any, who: Principal) -> None:
    """``conn`` just joined as ``who``: end its signed-in state at the token's expiry."""
    if who.is_guest or who.user_id is None or hub.tokens is None:
        return
    life = conn.auth
    if life is None:
        life = conn.auth = TokenLife(conn, who.user_id)
    _schedule(hub, life, who)


def _schedule(hub: Any, life: TokenLife, who: Principal) -> None:
    exp = _expires_at(who)
    life.due = None
    if exp is not None:
        hub.tokens.add(life, exp + LEEWAY_S)


def _expire(hub: Any, life: TokenLife) -> None:
    conn = life.conn
    if conn.closed or life.expired:
        return
    life.expired = True
    life.due = None
    hub.sign_out(conn)  # no more private events
    conn.principal = GUEST
    Broadcast(dict(TOKEN_EXPIRED_FRAME)).deliver(conn)


def check(conn: Any) -> None:
    """Raise ``token_expired`` when the socket's token expired and was not refreshed
    (called before chat and commands; the guest checks come after)."""
    life = conn.auth
    if life is not None and life.expired:
        raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "your token expired; send refresh "
                            "with a new one to sign in again")


async def refresh(app: Any, hub: Any, conn: Any, token: str) -> dict[str, Any]:
    """The ``refresh`` frame: a new token for the socket's user."""
    try:
        who = await app.state.verifier.verify(token)
    except ApiError as exc:
        raise ProtocolError(exc.code, exc.message) from None
    life: TokenLife | None = conn.auth
    if life is None or who.user_id != life.user_id:
        raise ProtocolError(ErrorCode.TOKEN_USER_MISMATCH, "a refresh must carry a token "
                            "of the socket's own user; open another socket to switch")
    conn.principal = who
    if life.expired:
        life.expired = False
        hub.sign_in(conn)
    _schedule(hub, life, who)
    exp = _expires_at(who)
    return {"user_id": who.user_id, "expires_at": None if exp is None else int(exp * 1000)}


def forget(conn: Any) -> None:
    """The socket closed: its TokenLife lets go of it."""
    life = conn.auth
    if life is not None:
        life.conn = None
        life.due = None
