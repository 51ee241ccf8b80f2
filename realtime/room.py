"""One drop's viewers in this process: its stream in order, and what each socket gets.

A :class:`Room` receives the drop's publications from the hub and turns them into
fan-out jobs (realtime.dispatch):

* **Durable events in order.** The room tracks the drop's last position. A durable
  publication that does not follow it (a lost subscriber connection, Redis killing
  the client over its output-buffer limit) makes the room fetch the missing events
  from history first; if they are no longer there, every viewer of the room gets a
  fresh snapshot (``recovered: false``).
* **Drop events first.** Durable events that arrive in one turn of the event loop
  leave in one message (a batch, docs/protocol.md), in the urgent lane: the events
  of one creator action (``drop.state`` and ``drop.buy_now``, published together)
  reach each socket as one message.
* **Chat in the bulk lane**, always (realtime.chatstream): in a small room each
  message at once, in a big room one sampled batch per interval. A drop event never
  waits for chat: the chat the room still holds, and what a chat job in progress has
  not delivered yet, go out *in the drop event's own message*, before it (one write
  per socket, positions in order).
* **The chat quiet.** In a big room a ``drop.*`` event takes that chat thinned (the
  staff's messages and each viewer's own, ``skipped`` for the rest), and the next
  chat batch waits ``DROPSERVER_CHAT_QUIET_MS`` after the event reached every socket:
  the sockets' writes, and the viewers' reading, go to BUY NOW at the moment that
  counts. History and ``since`` resumes are untouched.
* **Coalescing.** ``stock``, ``campaign.progress`` and ``viewers`` reach a socket at
  most once per ``DROPSERVER_STOCK_COALESCE_MS`` / ``..._VIEWERS_COALESCE_MS`` per drop,
  latest wins (``stock`` merges per product). The interval grows with the room: a
  flush costs a socket write per local viewer (~30 us on loopback), so a room of N
  local viewers flushes at most every N / ``DROPSERVER_COALESCE_BUDGET`` seconds
  (``viewers``: N / ``DROPSERVER_VIEWERS_BUDGET``).
  Durable and private events are never coalesced or dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from realtime import channels, history, metrics, protocol
from realtime.channels import Kind, Publication
from realtime.chatstream import CHAT_EVENT, ChatBatch, ChatStream, thinned
from realtime.connection import STAFF_ROLES, Connection, spawn
from realtime.dispatch import Job
from realtime.wire import Broadcast, Lane

if TYPE_CHECKING:
    from realtime.hub import Hub

__all__ = ["Room", "merge_volatile"]

log = logging.getLogger("dropserver.realtime")

CHAT_RETRY_S = 0.005  # a chat batch due while a drop event is fanned out waits this long
RECENT = 256  # durable events a room keeps for joins


def merge_volatile(event: str, old: dict[str, Any] | None,
                   new: dict[str, Any]) -> dict[str, Any]:
    """Latest wins; ``stock`` merges per product."""
    if event == "stock" and old is not None:
        products = dict(old.get("products") or {})
        products.update(new.get("products") or {})
        return {**old, **new, "products": products}
    return new


class Room:
    """The local viewers of one drop; see the module docstring."""

    def __init__(self, hub: Hub, drop_id: int) -> None:
        self.hub = hub
        self.drop_id = drop_id
        self.channel = channels.drop_channel(drop_id)
        self.conns: set[Connection] = set()
        self.staff: set[Connection] = set()  # of conns: creator, admins, moderators
        self.joining: set[Connection] = set()
        self.position = history.Position("", 0)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.resyncing = False
        self.backlog: list[Publication] = []
        # The last durable events applied, in order: a join answered from here needs
        # no history read from Redis (realtime.gateway).
        self.recent: collections.deque[Publication] = collections.deque(maxlen=RECENT)
        self.latest: dict[str, dict[str, Any]] = {}  # last volatile data sent, by event
        self.viewers = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._last_sent: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._unsubscribe: asyncio.TimerHandle | None = None
        self._outbox: list[dict[str, Any]] = []  # durable frames of this loop turn
        self._outbox_flush: asyncio.Handle | None = None
        s = hub.settings
        self.chat = ChatStream(batch_s=s.chat_batch_ms / 1000, budget=s.chat_budget,
                               read_rate=s.chat_read_rate,
                               min_viewers=s.chat_batch_viewers, rng=random.Random())
        self._chat_timer: asyncio.TimerHandle | None = None
        self._chat_job: Job | None = None  # the chat batch being fanned out
        self.quiet_s = s.chat_quiet_ms / 1000
        # A big room's next chat batch waits until then (time.monotonic): the chat
        # quiet after a drop event reached every socket.
        self._quiet_until = 0.0
        # Sockets that joined since the last chat batch, with the offset their join
        # answer covered: the batch must not repeat what they already have.
        self._fresh: dict[Connection, tuple[str, int]] = {}
        # Live sockets by the user they joined as (a token that expires makes a socket
        # a guest: it stays here, and _chat_of asks the batch about it all the same).
        self._by_user: dict[str, set[Connection]] = {}
        self._user_of: dict[Connection, str] = {}

    def __len__(self) -> int:
        return len(self.conns) + len(self.joining)

    @property
    def big(self) -> bool:
        """Chat goes out in sampled batches per interval (realtime.chatstream)."""
        return self.chat.big(len(self.conns))

    # -- delivery -----------------------------------------------------------------
    def broadcast(self, frame: dict[str, Any], key: str | None = None) -> int:
        """Send a volatile ``frame`` to every local viewer (bulk lane)."""
        if not self.conns:
            return 0
        self.hub.dispatcher.submit(Job(
            [(Broadcast(frame, lane=Lane.BULK, key=key), list(self.conns))], Lane.BULK))
        return len(self.conns)

    def queue_durable(self, frame: dict[str, Any]) -> None:
        """Send ``frame`` at the end of this loop turn, batched with the others."""
        self._outbox.append(frame)
        if self._outbox_flush is None:
            self._outbox_flush = asyncio.get_running_loop().call_soon(self.flush_outbox)

    def flush_outbox(self) -> None:
        """Fan out the durable frames queued this turn (urgent lane), with the chat
        the room still holds before them."""
        if self._outbox_flush is not None:
            self._outbox_flush.cancel()
            self._outbox_flush = None
        frames, self._outbox = self._outbox, []
        if not frames:
            return
        if len(frames) > 1:
            metrics.BATCHED.inc(len(frames))
        self._send_positioned(frames)

    def _send_positioned(self, frames: list[dict[str, Any]]) -> None:
        """An urgent job for ``frames``; chat not delivered yet rides in front (thinned
        in front of a drop event in a big room: the chat quiet)."""
        if not self.conns:
            self.chat.take(0, time.monotonic())  # nobody to tell; history has it
            self._fresh.clear()
            return
        quiet = self.quiet_s > 0 and self.big and any(
            str(f.get("event", "")).startswith("drop.") for f in frames)
        prefix: list[tuple[Broadcast, Sequence[Connection]]] = []
        job = self._chat_job
        if job is not None and not job.done:
            prefix = job.remaining()
            job.cancel()
            self._chat_job = None
            if quiet:
                prefix = self._thin(prefix)
        batch = self._take_chat(thin=quiet)
        if not prefix and batch is None:
            message = frames if len(frames) > 1 else frames[0]
            segments = [(Broadcast(message, positioned=True), list(self.conns))]
        else:
            segments = self._segments(prefix, batch, frames)
        if quiet:
            # At least the quiet from now; from when the last socket had it, once it did.
            self._quiet_until = max(self._quiet_until, time.monotonic() + self.quiet_s)
        self.hub.dispatcher.submit(Job(segments, Lane.URGENT,
                                       on_done=self._drop_event_out if quiet else None))

    def _drop_event_out(self, job: Job) -> None:
        """A drop event reached every socket: the chat quiet starts now."""
        self._quiet_until = max(self._quiet_until, time.monotonic() + self.quiet_s)

    def _thin(self, prefix: list[tuple[Broadcast, Sequence[Connection]]]
              ) -> list[tuple[Broadcast, Sequence[Connection]]]:
        """A chat job's undelivered (message, sockets), thinned: each socket gets the
        staff's messages and its user's own (chatstream.thinned). One message for
        most sockets; one per poster for the posters' sockets (from the per-user
        index, not a look at each socket)."""
        by_user = self._by_user
        out: list[tuple[Broadcast, Sequence[Connection]]] = []
        for b, conns in prefix:
            run = b.chat
            if run is None:  # not chat: as it was
                out.append((b, conns))
                continue
            posters = {data.get("user_id") for _, data in run.messages
                       if data.get("role") not in STAFF_ROLES}
            special: set[Connection] = set()
            for user in posters:
                if isinstance(user, str):
                    special.update(by_user.get(user, ()))
            plain = [c for c in conns if c not in special] if special else list(conns)
            if plain:
                out.append((Broadcast(thinned(run, None), positioned=True), plain))
            mine: dict[str | None, list[Connection]] = {}
            for conn in special.intersection(conns):
                mine.setdefault(conn.user_id, []).append(conn)
            for user, some in mine.items():
                out.append((Broadcast(thinned(run, user), positioned=True), some))
        return out

    def _segments(self, prefix: list[tuple[Broadcast, Sequence[Connection]]],
                  batch: ChatBatch | None,
                  frames: list[dict[str, Any]]) -> list[tuple[Broadcast, list[Connection]]]:
        """Group sockets by what they get: [their undelivered chat..., frames]. Most get
        the same (``prefix``: a chat job's undelivered (message, sockets), then the
        batch's default), so only the few in :meth:`_chat_special` are looked at one
        by one (one by one, all 10,000 took ~18 ms in front of BUY NOW)."""
        conns = self.conns
        special = self._chat_special(batch) if batch is not None else set()
        default = batch.default if batch is not None else None
        groups: dict[tuple[int, int], tuple[list[dict[str, Any]], list[Connection]]] = {}

        def members(before: Broadcast | None, chat: Broadcast | None) -> list[Connection]:
            key = (id(before), id(chat))
            group = groups.get(key)
            if group is None:
                head = (before.frames if before else []) + (chat.frames if chat else [])
                group = groups[key] = (head + frames, [])
            return group[1]

        def add(before: Broadcast | None, some: Iterable[Connection]) -> None:
            plain = [c for c in some if c not in special]
            if plain:
                members(before, default).extend(plain)
            for conn in special.intersection(some):
                members(before, self._chat_of(batch, conn)).append(conn)

        reached: set[Connection] = set()
        for before, some in prefix:
            live = [c for c in some if c in conns]  # not those that left since
            reached.update(live)
            add(before, live)
        add(None, conns - reached if reached else conns)
        if batch is not None:
            self._fresh.clear()
        return [(Broadcast(fs if len(fs) > 1 else fs[0], positioned=True), group)
                for fs, group in groups.values() if group]

    def _chat_special(self, batch: ChatBatch) -> set[Connection]:
        """The room's sockets that may not get ``batch.default``: they joined while the
        batch was open (their join answer had part of it), or a message of their user
        was left out of the sample."""
        conns = self.conns
        special = {c for c in self._fresh if c in conns}
        by_user = self._by_user
        for user in batch.left_out_by:
            special.update(by_user.get(user, ()))
        return special

    def _chat_of(self, batch: ChatBatch | None, conn: Connection) -> Broadcast | None:
        if batch is None:
            return None
        after = self._fresh.get(conn)
        return batch.for_conn(conn, after[1] if after else None)

    def _take_chat(self, thin: bool = False) -> ChatBatch | None:
        if self._chat_timer is not None:
            self._chat_timer.cancel()
            self._chat_timer = None
        return self.chat.take(len(self.conns), time.monotonic(), thin=thin)

    # -- chat batches ---------------------------------------------------------------
    def _add_chat(self, pub: Publication) -> None:
        if self._outbox:
            self.flush_outbox()  # earlier drop events leave before this chat
        self.chat.add(pub)
        if self._chat_timer is None:
            due = self.chat.last_flush + self.chat.interval(len(self.conns))
            if self.big:
                due = max(due, self._quiet_until)
            self._chat_timer = asyncio.get_running_loop().call_later(
                max(0.0, due - time.monotonic()), self._flush_chat)

    def _flush_chat(self) -> None:
        self._chat_timer = None
        if not self.chat:
            return
        busy = self._chat_job is not None and not self._chat_job.done
        if busy or self.hub.dispatcher.urgent_busy:
            # Drop events first, and one chat batch per room at a time.
            self._chat_timer = asyncio.get_running_loop().call_later(
                CHAT_RETRY_S, self._flush_chat)
            return
        quiet = self._quiet_until - time.monotonic()
        if quiet > 0 and self.big:  # the chat quiet after a drop event
            self._chat_timer = asyncio.get_running_loop().call_later(quiet, self._flush_chat)
            return
        batch = self._take_chat()
        if batch is None or not self.conns:
            self._fresh.clear()
            return
        special = self._chat_special(batch)
        groups: dict[int, tuple[Broadcast, list[Connection]]] = {}
        plain = [c for c in self.conns if c not in special] if special else list(self.conns)
        if plain:
            groups[id(batch.default)] = (batch.default, plain)
        for conn in special:
            b = self._chat_of(batch, conn)
            if b is None:
                continue
            group = groups.get(id(b))
            if group is None:
                group = groups[id(b)] = (b, [])
            group[1].append(conn)
        self._fresh.clear()
        self._chat_job = self.hub.dispatcher.submit(Job(list(groups.values()), Lane.BULK))

    # -- the durable stream ------------------------------------------------------------
    def on_publication(self, pub: Publication) -> None:
        for conn in self.joining:
            if conn.pending is not None:
                conn.pending.append(pub)
        if pub.kind is Kind.DURABLE:
            self.hub.snapshots.applied(self.drop_id, pub.event, pub.data, pub.epoch,
                                       pub.offset, self.hub.settings.chat_history)
            self._on_durable(pub)
        else:
            self.on_volatile(pub.event, pub.data)

    def _on_durable(self, pub: Publication) -> None:
        if self.resyncing:
            self.backlog.append(pub)
            return
        pos = self.position
        if pub.epoch == pos.epoch and pub.offset <= pos.offset:
            return  # already delivered (filled from history)
        follows = (pub.epoch == pos.epoch and pub.offset == pos.offset + 1) or (
            pos.offset == 0 and pub.offset == 1)
        if not follows:
            self.backlog.append(pub)
            self.resyncing = True
            spawn(self._resync())
            return
        self._apply(pub)

    def _apply(self, pub: Publication) -> None:
        self.position = history.Position(pub.epoch, pub.offset)
        if self.recent and self.recent[-1].epoch != pub.epoch:
            self.recent.clear()  # a new epoch: offsets start again
        self.recent.append(pub)
        if pub.event == CHAT_EVENT:
            self._add_chat(pub)
        else:
            self.queue_durable(protocol.event_frame(pub.event, pub.data, pub.epoch,
                                                    pub.offset))

    def joined(self, conn: Connection, epoch: str, offset: int) -> None:
        """``conn`` was answered up to ``(epoch, offset)`` and is live from now on."""
        self.conns.add(conn)
        user_id = conn.user_id
        if user_id:
            self._by_user.setdefault(user_id, set()).add(conn)
            self._user_of[conn] = user_id
        if conn.staff:
            self.staff.add(conn)  # not a viewer (realtime.presence)
        # The next chat batch must skip what the answer had: the open batch's chat, or
        # events the answer read from Redis before they reached this room.
        if self.chat or (epoch == self.position.epoch and offset > self.position.offset):
            self._fresh[conn] = (epoch, offset)

    def discard(self, conn: Connection) -> None:
        self.conns.discard(conn)
        user_id = self._user_of.pop(conn, None)
        if user_id is not None:
            mine = self._by_user[user_id]
            mine.discard(conn)
            if not mine:
                del self._by_user[user_id]
        self.staff.discard(conn)
        self.joining.discard(conn)
        self._fresh.pop(conn, None)

    def events_since(self, pos: history.Position) -> list[Publication] | None:
        """The events after ``pos`` up to the room's position, from memory; None when
        the room cannot tell (resyncing, another epoch, older than it keeps)."""
        mine = self.position
        if self.resyncing or pos.epoch != mine.epoch or pos.offset > mine.offset:
            return None
        if pos.offset == mine.offset:
            return []
        recent = self.recent
        if not recent or recent[0].offset > pos.offset + 1 or recent[-1].offset != mine.offset:
            return None
        return [p for p in recent if p.offset > pos.offset]

    def check_gap(self) -> None:
        """After a lost subscription: fetch whatever was published meanwhile."""
        if not self.resyncing:
            self.resyncing = True
            spawn(self._resync())

    async def _resync(self) -> None:
        try:
            while True:
                rec = await history.recover(self.hub.redis, self.drop_id, self.position,
                                            self.hub.settings.history_size)
                if rec.recovered:
                    if rec.publications:
                        metrics.GAPS.labels("filled").inc()
                        log.info("gap filled from history", extra={
                            "drop_id": self.drop_id, "events": len(rec.publications)})
                    for pub in rec.publications:
                        self._apply(pub)
                    self.position = rec.position
                else:
                    metrics.GAPS.labels("resync").inc()
                    log.warning("gap not in history; sending fresh snapshots",
                                extra={"drop_id": self.drop_id})
                    snap = await self.hub.snapshots.get(self.drop_id, fresh=True)
                    if snap is None:
                        return
                    p = snap["pos"]
                    self.position = history.Position(p["epoch"], p["offset"])
                    self.recent.clear()
                    self._reset_stream()
                    frame = self.hub.joined_frame(self, None, snap, recovered=False,
                                                  events=[])
                    self.hub.dispatcher.submit(Job(
                        [(Broadcast(frame, positioned=True), list(self.conns))]))
                backlog, self.backlog = self.backlog, []
                pos = self.position
                rest = [p for p in backlog
                        if not (p.epoch == pos.epoch and p.offset <= pos.offset)]
                gap = False
                for pub in rest:
                    if pub.epoch == self.position.epoch and \
                            pub.offset == self.position.offset + 1:
                        self._apply(pub)
                    else:
                        gap = True
                        break
                if not gap:
                    return
        except Exception:
            log.exception("resync failed; asking viewers to rejoin",
                          extra={"drop_id": self.drop_id})
            for conn in list(self.conns):
                conn.close(protocol.CloseCode.RESYNC, "resync")
        finally:
            self.resyncing = False
            if self.backlog:  # arrived while the last fetch was in flight
                backlog, self.backlog = self.backlog, []
                for pub in backlog:
                    self._on_durable(pub)

    def _reset_stream(self) -> None:
        """A fresh snapshot replaces everything before it: drop what is pending."""
        self.flush_outbox()
        self._take_chat()
        if self._chat_job is not None:
            self._chat_job.cancel()
            self._chat_job = None
        self._fresh.clear()

    # -- volatile, coalesced ----------------------------------------------------------
    def coalesce_interval(self, event: str) -> float | None:
        """Seconds between flushes of ``event`` for this room, or None: not coalesced."""
        base = self.hub.intervals.get(event)
        settings = self.hub.settings
        budget = settings.coalesce_budget
        if event == "viewers" and settings.viewers_budget > 0:
            # A count is worth less than stock: at 12,500 local viewers, the 5,000
            # frames/s of stock cost a tenth of a worker's joins during a ramp.
            budget = settings.viewers_budget
        if base is None or budget <= 0:
            return base
        return max(base, len(self.conns) / budget)

    def on_volatile(self, event: str, data: dict[str, Any]) -> None:
        interval = self.coalesce_interval(event)
        if interval is None:
            self.latest[event] = data
            self.broadcast(protocol.volatile_frame(event, data), key=event)
            return
        self._pending[event] = merge_volatile(event, self._pending.get(event), data)
        if event in self._timers:
            metrics.COALESCED.labels("room").inc()
            return
        wait = self._last_sent.get(event, 0.0) + interval - time.monotonic()
        if wait <= 0:
            self._flush(event)
        else:
            self._timers[event] = asyncio.get_running_loop().call_later(
                wait, self._flush, event)

    def _flush(self, event: str) -> None:
        self._timers.pop(event, None)
        data = self._pending.pop(event, None)
        if data is None:
            return
        self._last_sent[event] = time.monotonic()
        self.latest[event] = merge_volatile(event, self.latest.get(event), data)
        self.broadcast(protocol.volatile_frame(event, data), key=event)

    def close(self) -> None:
        if self._outbox_flush is not None:
            self._outbox_flush.cancel()
            self._outbox_flush = None
        if self._chat_timer is not None:
            self._chat_timer.cancel()
            self._chat_timer = None
        if self._chat_job is not None:
            self._chat_job.cancel()
            self._chat_job = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
