"""Chat in a big room: a bounded stream, one batch per socket per interval, sampled.

Chat always goes out in the bulk lane, after drop events (realtime.room keeps the
positions in order). Below ``DROPSERVER_CHAT_BATCH_VIEWERS`` local viewers each
message leaves at once, whole. From there on, one chat message would cost one socket
write per viewer (~15-30 us each on loopback): at 12,500 viewers per process and 50
messages a second that is more than a core, in front of BUY NOW. So a big room
collects its chat here and sends it as one batch per socket at most every

    interval = max(DROPSERVER_CHAT_BATCH_MS, local viewers / DROPSERVER_CHAT_BUDGET)

and each batch carries at most ``DROPSERVER_CHAT_READ_RATE`` x interval messages (what
a person can read): past that, a fair sample (every message equally likely), the
same for every socket of the process so it is encoded once. Always in the batch: the
creator's and moderators' messages (``data["role"]``, set by realtime.chat), and for
each viewer its own messages (a few per-viewer variants of the batch).

Positions stay exact: every message keeps its offset in history, the frames of a
batch are in offset order, and a batch that left messages out ends with a
``skipped`` frame (count, and the position the batch accounts up to) so that a
client tells chat left out of its stream from a lost event (docs/protocol.md). A
resume with ``since`` gets every message from history.

**The chat quiet.** When a drop event (``drop.*``) goes out in a big room, the chat
in front of it (the open batch, and what a chat batch in progress has not delivered
yet) rides in its message *thinned*: only the creator's and moderators' messages
and each viewer's own, then ``skipped`` for the rest (``ChatStream.take(...,
thin=True)``, :func:`thinned`); realtime.room then sends the next batch no sooner
than ``DROPSERVER_CHAT_QUIET_MS`` after the drop event reached every socket. The
sockets' writes (and the viewers' reading) go to BUY NOW at the moment that counts,
not to chat that would reach them in the same breath.
"""

from __future__ import annotations

import random
from typing import Any

from realtime import metrics, protocol
from realtime.channels import Publication
from realtime.connection import STAFF_ROLES
from realtime.wire import Broadcast, ChatRun, Lane

__all__ = ["ChatBatch", "ChatStream", "sample", "thinned"]

CHAT_EVENT = "chat.message"


def sample(pubs: list[Publication], cap: int, rng: random.Random) -> list[Publication]:
    """At most ``cap`` of ``pubs`` (more only if the staff's alone are more): every
    staff message, then a uniform random choice of the others; in offset order."""
    if len(pubs) <= cap:
        return list(pubs)
    staff = [p for p in pubs if p.data.get("role") in STAFF_ROLES]
    others = [p for p in pubs if p.data.get("role") not in STAFF_ROLES]
    room = max(0, cap - len(staff))
    chosen = staff + (rng.sample(others, room) if room < len(others) else others)
    chosen.sort(key=lambda p: p.offset)
    return chosen


def thinned(run: ChatRun, me: str | None) -> list[dict[str, Any]]:
    """The chat of ``run`` as a socket of user ``me`` gets it in front of a drop event
    in a big room: the staff's messages and ``me``'s own, then a ``skipped`` frame for
    the rest (never empty: at least the ``skipped`` frame)."""
    frames = [protocol.event_frame(CHAT_EVENT, data, run.epoch, offset)
              for offset, data in run.messages
              if data.get("role") in STAFF_ROLES or (me is not None
                                                     and data.get("user_id") == me)]
    left_out = len(run.messages) - len(frames)
    if left_out or not frames:
        frames.append(protocol.skipped_frame(left_out, run.epoch, run.last))
    return frames


class ChatBatch:
    """One interval's chat, taken out of the stream: the message for most sockets and
    the variants for the few that need another (their own message was left out, or
    they joined in the middle of the batch).

    In a storm nearly every poster's message is left out of the sample, so a batch
    has a variant per poster (~225 at 200 messages/s and a 1.25 s interval): what
    the variants share is built once (each message's frame, the run of every
    message, the messages by poster), and a variant costs its own few frames and
    one encoding."""

    __slots__ = ("_by_user", "_chosen_offsets", "_frames", "_runs", "_variants", "chosen",
                 "default", "left_out_by", "pubs")

    def __init__(self, pubs: list[Publication], chosen: list[Publication],
                 left_out_by: frozenset[str]) -> None:
        self.pubs = pubs
        self.chosen = chosen
        self.left_out_by = left_out_by  # users with a message left out of the default
        self._frames: dict[int, dict[str, Any]] = {}
        self._runs: dict[int | None, tuple[tuple[int, dict[str, Any]], ...]] = {}
        self._chosen_offsets: frozenset[int] | None = None
        self._by_user: dict[str, list[Publication]] | None = None
        self._variants: dict[tuple[str | None, int | None], Broadcast | None] = {}
        self.default = self._make(pubs, chosen, None)

    def for_conn(self, conn: Any, after: int | None = None) -> Broadcast | None:
        """The batch as ``conn`` gets it: the default, or its variant with its own
        messages, or without the messages up to ``after`` (its join answer had them).
        None: nothing left for it."""
        me = conn.user_id
        own = me if me is not None and me in self.left_out_by else None
        if own is None and after is None:
            return self.default
        key = (own, after)
        variants = self._variants
        if key not in variants:
            variants[key] = self._variant(own, after)
        return variants[key]

    def _variant(self, own: str | None, after: int | None) -> Broadcast | None:
        pubs = self.pubs if after is None else [p for p in self.pubs if p.offset > after]
        if not pubs:
            return None
        if self._chosen_offsets is None:
            self._chosen_offsets = frozenset(p.offset for p in self.chosen)
            by_user: dict[str, list[Publication]] = {}
            for p in self.pubs:
                user = p.data.get("user_id")
                if isinstance(user, str):
                    by_user.setdefault(user, []).append(p)
            self._by_user = by_user
        low = -1 if after is None else after
        mine = {p.offset: p for p in self.chosen if p.offset > low}
        if own is not None:
            assert self._by_user is not None
            for p in self._by_user.get(own, ()):
                if p.offset > low:
                    mine[p.offset] = p
        return self._make(pubs, [mine[k] for k in sorted(mine)], after)

    def _frame(self, p: Publication) -> dict[str, Any]:
        frame = self._frames.get(p.offset)
        if frame is None:
            frame = self._frames[p.offset] = protocol.event_frame(p.event, p.data, p.epoch,
                                                                  p.offset)
        return frame

    def _make(self, pubs: list[Publication], chosen: list[Publication],
              after: int | None) -> Broadcast:
        frames = [self._frame(p) for p in chosen]
        last = pubs[-1]
        left_out = len(pubs) - len(chosen)
        if left_out:
            frames.append(protocol.skipped_frame(left_out, last.epoch, last.offset))
        messages = self._runs.get(after)
        if messages is None:
            messages = self._runs[after] = tuple((p.offset, p.data) for p in pubs)
        run = ChatRun(last.epoch, last.offset, messages, len(chosen))
        return Broadcast(frames if len(frames) > 1 else frames[0], lane=Lane.BULK, chat=run)


class ChatStream:
    """The open batch of one room (see the module docstring)."""

    def __init__(self, *, batch_s: float, budget: float, read_rate: float,
                 min_viewers: int = 0, rng: random.Random | None = None) -> None:
        self.min_viewers = min_viewers  # below: no interval, no sample
        self.batch_s = batch_s
        self.budget = budget
        self.read_rate = read_rate
        self.pubs: list[Publication] = []
        self.last_flush = 0.0
        self._rng = rng or random.Random()

    def __bool__(self) -> bool:
        return bool(self.pubs)

    def big(self, viewers: int) -> bool:
        return viewers >= self.min_viewers

    def interval(self, viewers: int) -> float:
        """Seconds between two batches to a room of ``viewers`` local sockets (0 in a
        small room: each message leaves at once, batched only with the others of its
        turn of the event loop)."""
        if not self.big(viewers):
            return 0.0
        if self.budget > 0:
            return max(self.batch_s, viewers / self.budget)
        return self.batch_s

    def cap(self, viewers: int) -> int | None:
        """Messages a batch carries before it is sampled (None: all of them)."""
        if not self.big(viewers):
            return None
        return max(1, round(self.read_rate * self.interval(viewers)))

    def add(self, pub: Publication) -> None:
        self.pubs.append(pub)

    def take(self, viewers: int, now: float, thin: bool = False) -> ChatBatch | None:
        """Close the open batch: sample it for ``viewers`` sockets and encode it.
        ``thin``: in front of a drop event, only the staff's messages (and each
        poster's own, per socket) instead of a sample (see the module docstring)."""
        pubs, self.pubs = self.pubs, []
        self.last_flush = now
        if not pubs:
            return None
        cap = 0 if thin else self.cap(viewers)
        chosen = list(pubs) if cap is None else sample(pubs, cap, self._rng)
        metrics.CHAT_BATCHES.inc()
        if len(chosen) < len(pubs):
            counter = metrics.CHAT_THINNED if thin else metrics.CHAT_SAMPLED_OUT
            counter.inc(len(pubs) - len(chosen))
        kept = {p.offset for p in chosen}
        left_out_by = frozenset(str(p.data.get("user_id")) for p in pubs
                                if p.offset not in kept)
        return ChatBatch(pubs, chosen, left_out_by)
