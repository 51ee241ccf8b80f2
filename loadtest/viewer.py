"""One rehearsal viewer as a pure state machine: frames in, frames to send out.

No I/O and no clock: the swarm passes ``now`` (``time.monotonic()``) with every
call. A viewer joins its drop (``subscribe``, with the last position it saw when it
comes back), checks that durable events arrive in position order with no offset
skipped, notes when BUY NOW reached it, buys with its pre-drawn probability and
times the reply. Frames are built and encoded with :mod:`realtime.protocol`
(docs/protocol.md); server frames are read by :func:`decode_server`, which, unlike the
server's validating ``protocol.decode`` for client frames, accepts integer map keys
(``stock`` carries product ids as keys).

A viewer reads through :func:`shared_frame`: a broadcast (a chat batch, BUY NOW)
reaches every viewer of a swarm as the same bytes, so it is decoded once per swarm
process, not once per viewer. Reading chat was the load generator's largest cost (a
21-frame batch: 110-135 us of CPU per viewer, half of it msgpack; at 10,000 viewers
~1.1-1.4 cores on the machine the server runs on), and the floor's viewers read the
same way, so both sides of the ratio pay the same. Once decoded, checking a chat
batch's 20-odd positions was most of what was left (~25 us per viewer per batch);
a frame of events is now checked once per starting position, not once per viewer
(:class:`SharedFrame`), with the same result for each.

A big room's chat may leave messages out of a viewer's stream: an offset missing
before the position of a ``skipped`` frame in the same message is chat left out
(counted in ``chat_skipped``), any other missing offset a lost event (``gaps``;
docs/protocol.md). Chat sent by the rehearsal carries its send time (``chat_text``),
so a viewer that records chat (``ViewerConfig.chat_sample``) times its delivery.

What a swarm reports of its viewers is :mod:`loadtest.viewer_summary`; the viewer of
the bare-broadcast floor is :mod:`loadtest.floor_viewer`.
"""

from __future__ import annotations

import enum
import json
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack

from realtime.protocol import ErrorCode, Format, ServerType, encode

__all__ = ["BuyOutcome", "Phase", "SharedFrame", "UndecodableFrame", "Viewer", "ViewerConfig",
           "buy_plan", "chat_text", "decode_server", "decode_shared", "shared_frame"]

CHAT_PREFIX = "rc "  # rehearsal chat: "rc <monotonic send time> <sender>"


def chat_text(sent_at: float, sender: str) -> str:
    """The text of a rehearsal chat message: it carries its send time."""
    return f"{CHAT_PREFIX}{sent_at:.6f} {sender}"


def _chat_sent_at(text: Any) -> float | None:
    if not isinstance(text, str) or not text.startswith(CHAT_PREFIX):
        return None
    try:
        return float(text.split(" ", 2)[1])
    except (IndexError, ValueError):
        return None


def buy_plan(draw: float, probability: float,
             delay_ms: tuple[float, float]) -> tuple[bool, float]:
    """Whether a viewer buys, and its reaction time in seconds, from its one draw in
    [0, 1) of the swarm's seeded RNG: the same seed buys with the same viewers, after
    the same delay (uniform over ``delay_ms`` across the buyers)."""
    wants = draw < probability
    lo, hi = delay_ms
    return wants, ((lo + (hi - lo) * (draw / probability)) / 1000.0
                   if wants and probability > 0 else 0.0)


class UndecodableFrame(ValueError):
    """A server frame that is not one msgpack/JSON map (or a list of them)."""


def decode_server(data: bytes | bytearray | str) -> list[dict[str, Any]]:
    """One server frame as a list of messages (a list frame carries a batch)."""
    try:
        obj = json.loads(data) if isinstance(data, str) else \
            msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise UndecodableFrame(str(exc)[:100]) from None
    items = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(item, dict) for item in items):
        raise UndecodableFrame("not a map")
    return items


SHARED_MIN_BYTES = 64  # shorter frames are replies and pings: one viewer's own
SHARED_FRAMES = 64  # distinct broadcast frames remembered (the oldest goes first)
SHARED_STEPS = 16  # starting positions remembered per frame (see SharedFrame.step)


class SharedFrame:
    """One broadcast frame as every viewer of the process reads it: its messages,
    decoded once, and, for a frame of events and ``skipped`` frames only (a chat
    batch; BUY NOW with the chat in front of it), what reading it does to a viewer's
    position and counters, by the position the viewer had before it.

    That part depends only on where the viewer was: viewers at the same position
    (nearly all of them, one broadcast after another) end at the same position with
    the same counts. So the first viewer at a position has the frame read in full
    (:meth:`Viewer.read_messages`, every check of every message, by a scratch viewer
    at that position), and the result is remembered for the next (:meth:`step`):
    exactly what each would have found, without each checking 20-odd positions (the
    swarm's largest cost in a chat storm: docs/benchmarks.md, "The load generator's
    reading cost"). What is each viewer's own is still done per viewer, at the moment
    it reads the frame: the events other than chat (``others``: BUY NOW's time and the
    buy, sold out, ended, giveaways) and, on a viewer that times chat, each message's
    latency (``chat_times``). A viewer anywhere else (behind after a gap, a new epoch)
    gets its own reading; a frame with anything else in it (a reply, a ping, a
    ``joined``) is read by every viewer in full.
    """

    __slots__ = ("chat_times", "has_event", "items", "others", "shared", "steps")

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.steps: dict[tuple[str | None, int], tuple[Any, ...]] = {}
        self.has_event = False
        # The send time (and the server's ``at``) of each rehearsal chat message, in
        # order, for the viewers that time chat (as Viewer._event times each message).
        self.chat_times: list[tuple[float, Any]] = []
        self.others: list[dict[str, Any]] = []  # events other than chat, in order
        self.shared = all(self._take(m) for m in items)
        if not self.shared:
            self.chat_times, self.others = [], []

    def _take(self, message: Any) -> bool:
        """Note one message; False if it is not an event or ``skipped`` frame with a
        valid position (then the frame is read in full by every viewer)."""
        kind = message.get("t")
        if kind != ServerType.EVENT and kind != ServerType.SKIPPED:
            return False
        try:
            position_of(message["pos"])
        except (KeyError, TypeError, ValueError):
            return False
        if kind == ServerType.SKIPPED:
            return True
        self.has_event = True
        if message.get("event") != CHAT:
            self.others.append(message)
            return True
        data = message.get("data") or {}
        if not isinstance(data, dict):
            return False
        sent = _chat_sent_at(data.get("text"))
        if sent is not None:
            at = data.get("at")
            self.chat_times.append((sent, at if isinstance(at, int | float) else None))
        return True

    def step(self, epoch: str | None, offset: int) -> tuple[Any, ...] | None:
        """``(epoch, offset, durable, out_of_order, gaps, epoch_changes, chat_seen,
        chat_skipped)`` after this frame for a viewer at ``(epoch, offset)`` (the
        counters as increments); None where a viewer must read it itself."""
        key = (epoch, offset)
        found = self.steps.get(key)
        if found is not None:
            return found
        scratch = _scratch()
        scratch.epoch, scratch.offset = epoch, offset
        if scratch.read_messages(self.items, 0.0) or scratch.errors:
            return None  # not what such a frame does: read in full instead
        found = (scratch.epoch, scratch.offset, scratch.durable, scratch.out_of_order,
                 scratch.gaps, scratch.epoch_changes, scratch.chat_seen, scratch.chat_skipped)
        if len(self.steps) < SHARED_STEPS:
            self.steps[key] = found
        return found


_shared: dict[bytes | str, SharedFrame] = {}
_last_key: bytes | str = b""
_last_frame: SharedFrame | None = None


def shared_frame(data: bytes | bytearray | str) -> SharedFrame:
    """:func:`decode_server` as a :class:`SharedFrame`, remembering the last
    ``SHARED_FRAMES`` frames of at least ``SHARED_MIN_BYTES``: the same bytes again
    (one broadcast, the next viewer of the process) give the same frame without
    decoding. Its messages are shared between callers: read them, never change them."""
    global _last_key, _last_frame
    if len(data) < SHARED_MIN_BYTES:
        return SharedFrame(decode_server(data))
    key = bytes(data) if isinstance(data, bytearray) else data
    # The frame just read, again (the next socket of one broadcast): one comparison of
    # the bytes instead of hashing them (a chat batch: ~3 KB, ~2 us to hash).
    if _last_frame is not None and key == _last_key:
        return _last_frame
    frame = _shared.get(key)
    if frame is None:
        frame = SharedFrame(decode_server(key))
        if len(_shared) >= SHARED_FRAMES:
            del _shared[next(iter(_shared))]
        _shared[key] = frame
    _last_key, _last_frame = key, frame
    return frame


def decode_shared(data: bytes | bytearray | str) -> list[dict[str, Any]]:
    """The messages of :func:`shared_frame` (decoded once per process)."""
    return shared_frame(data).items


def position_of(pos: Any) -> tuple[str, int]:
    """``{epoch, offset}`` -> ``(epoch, offset)``."""
    return str(pos["epoch"]), int(pos["offset"])


class Phase(enum.Enum):
    IDLE = "idle"  # not connected yet
    CONNECTING = "connecting"  # TCP + WebSocket handshake under way
    JOINING = "joining"  # subscribe sent, no reply yet
    JOINED = "joined"
    CLOSED = "closed"


class BuyOutcome(enum.StrEnum):
    HELD = "held"  # a unit is reserved for this viewer
    SOLD_OUT = "sold_out"
    REJECTED = "rejected"  # any other error code (rate limited, not selling, ...)
    NO_REPLY = "no_reply"


@dataclass(frozen=True)
class ViewerConfig:
    drop_id: int
    encoding: str = "msgpack"  # "msgpack" (binary, default) or "json" (text subprotocol)
    buy_probability: float = 0.5
    buy_delay_ms: tuple[float, float] = (0.0, 200.0)
    chat_sample: int = 0  # every Nth viewer (by index) times the chat it gets; 0: none
    # The giveaway scenario: on giveaway.opened, enter (giveaway.enter) with this
    # probability, after a delay spread evenly over the viewers within this range.
    enter_probability: float = 0.0
    enter_delay_ms: tuple[float, float] = (0.0, 8000.0)


# Event names of contract 1 (COMMON.md) this viewer watches for.
BUY_NOW = "drop.buy_now"
SOLD_OUT = "drop.sold_out"
ENDED = "drop.ended"
CHAT = "chat.message"
GIVEAWAY_OPENED = "giveaway.opened"
GIVEAWAY_DRAWN = "giveaway.drawn"


class Viewer:
    """The state of one rehearsal viewer (kept small: a swarm holds ~15,000)."""

    __slots__ = (
        "_buy_delay",
        "_buy_product",
        "_buy_variant",
        "_join_id",
        "_msg_gaps",
        "_msg_skipped_to",
        "_next_id",
        "buy_code",
        "buy_id",
        "buy_now_at",
        "buy_now_late",
        "buy_outcome",
        "buy_reply_at",
        "buy_retries",
        "buy_sent_at",
        "buyer_number",
        "chat_after",
        "chat_lat",
        "chat_seen",
        "chat_sent",
        "chat_skipped",
        "config",
        "connect_started",
        "connected_at",
        "down",
        "durable",
        "ended_at",
        "epoch",
        "epoch_changes",
        "errors",
        "gaps",
        "gw_code",
        "gw_drawn",
        "gw_enter_id",
        "gw_new",
        "gw_reply_at",
        "gw_sent_at",
        "hold_id",
        "index",
        "joined_at",
        "joins",
        "last_event_at",
        "offset",
        "out_of_order",
        "outages",
        "phase",
        "reconnect_hint_ms",
        "reconnects",
        "recovery_failed",
        "sold_out_at",
        "user_id",
        "wants_to_buy",
    )

    def __init__(self, index: int, user_id: str, config: ViewerConfig, draw: float) -> None:
        self.index = index
        self.user_id = user_id
        self.config = config
        # Drawn once by the swarm's seeded RNG: the same seed buys with the same viewers.
        self.wants_to_buy, self._buy_delay = buy_plan(draw, config.buy_probability,
                                                       config.buy_delay_ms)
        self.phase = Phase.IDLE
        self._next_id = 1
        self._join_id: int | None = None
        self.epoch: str | None = None  # last durable position seen
        self.offset = 0
        self.gaps = 0  # durable events skipped (sum of offset jumps)
        self.out_of_order = 0  # durable events at or before the last offset
        self.epoch_changes = 0  # the stream restarted under us (history lost)
        self.recovery_failed = 0  # a resume the server could not serve in full
        self.durable = 0
        self.chat_seen = 0  # chat messages received live
        self.chat_skipped = 0  # chat offsets left out of this stream (skipped frames)
        # Delivery latencies of rehearsal chat (seconds), on sampled viewers only.
        self.chat_lat: list[float] | None = \
            [] if config.chat_sample and index % config.chat_sample == 0 else None
        # Of those, the part after the server accepted the message (its ``at``, wall
        # clock ms): publication, batching, fan-out and this viewer's reading; the rest
        # is the swarm's sending and the server's reading and checks.
        # (None where the message carried no ``at``), and each one's send time (the
        # sender's monotonic clock): both in the order of chat_lat, one per message, so
        # the rehearsal splits each latency by when it was posted (loadtest.figures).
        self.chat_after: list[float | None] | None = [] if self.chat_lat is not None else None
        self.chat_sent: list[float] | None = [] if self.chat_lat is not None else None
        self._msg_gaps: list[tuple[int, int]] | None = None  # missing ranges, this message
        self._msg_skipped_to = 0  # the highest skipped frame position in this message
        self.errors: Counter[str] | None = None
        self.joins = 0
        self.reconnects = 0
        self.reconnect_hint_ms: int | None = None
        self.connect_started: float | None = None
        self.connected_at: float | None = None
        self.joined_at: float | None = None
        self.buy_now_at: float | None = None
        self.buy_now_late = False  # learnt after a reconnect (history or snapshot), not live
        self.sold_out_at: float | None = None
        self.ended_at: float | None = None
        self.last_event_at: float | None = None
        self.buy_id: int | None = None
        self.buy_sent_at: float | None = None
        self.buy_reply_at: float | None = None
        self.buy_outcome: BuyOutcome | None = None
        self.buy_code: str | None = None
        self.buy_retries = 0  # the same buy sent again after a reconnect (same key)
        self._buy_product: Any = None
        self._buy_variant: Any = None
        self.hold_id: str | None = None  # what a held reply said
        self.buyer_number: int | None = None
        # Since when the socket is lost (and whether going_away announced it), until
        # the rejoin; then (lost at, back at, recovered, announced) goes to outages.
        self.down: tuple[float, bool] | None = None
        self.outages: list[tuple[float, float, bool, bool]] | None = None
        # The giveaway scenario: the entry sent and its answer (new entrant or a
        # refusal's code), and the result as this viewer was shown it ("seed:tickets").
        self.gw_enter_id: int | None = None
        self.gw_sent_at: float | None = None
        self.gw_reply_at: float | None = None
        self.gw_new: bool | None = None
        self.gw_code: str | None = None
        self.gw_drawn: str | None = None

    # -- state read by the swarm -----------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.phase in (Phase.JOINING, Phase.JOINED)

    @property
    def is_joined(self) -> bool:
        return self.phase is Phase.JOINED

    @property
    def format(self) -> Format:
        return Format.JSON if self.config.encoding == "json" else Format.MSGPACK

    def subprotocols(self) -> list[str]:
        return [self.format.value]

    def encode(self, message: dict[str, Any]) -> bytes | str:
        return encode(message, self.format)

    # -- transitions ------------------------------------------------------------------------
    def connecting(self, now: float) -> None:
        self.phase = Phase.CONNECTING
        if self.joined_at is None:  # join latency is the first join's (not a rejoin's)
            self.connect_started = now

    def opened(self, now: float) -> list[dict[str, Any]]:
        """The WebSocket is up: subscribe, resuming from the last position if any."""
        self.phase = Phase.JOINING
        self.connected_at = now
        self._join_id = self._new_id()
        frame: dict[str, Any] = {"t": "join", "id": self._join_id,
                                 "drop_id": self.config.drop_id}
        if self.epoch is not None:
            frame["since"] = {"epoch": self.epoch, "offset": self.offset}
        return [frame]

    def closed(self, code: int | None, reason: str, now: float) -> None:
        if self.joins and self.down is None and self.phase in (Phase.JOINING, Phase.JOINED):
            self.down = (now, self.reconnect_hint_ms is not None)
        self.phase = Phase.CLOSED
        if self.buy_sent_at is not None and self.buy_outcome is None:
            self.buy_outcome = BuyOutcome.NO_REPLY

    def received(self, data: bytes | str, now: float) -> list[tuple[float, dict[str, Any]]]:
        """A frame from the server: ``[(delay_s, message to send), ...]``."""
        try:
            frame = shared_frame(data)
        except UndecodableFrame:
            self._error("undecodable_frame")
            return []
        if frame.shared:
            step = frame.step(self.epoch, self.offset)
            if step is not None:  # what reading it in full gives, found once (SharedFrame)
                (self.epoch, self.offset, durable, out_of_order, gaps, epoch_changes,
                 chat_seen, chat_skipped) = step
                self.durable += durable
                self.out_of_order += out_of_order
                self.gaps += gaps
                self.epoch_changes += epoch_changes
                self.chat_seen += chat_seen
                self.chat_skipped += chat_skipped
                if frame.has_event:
                    self.last_event_at = now
                if self.chat_lat is not None and frame.chat_times:
                    self._time_chat(frame.chat_times, now)
                if not frame.others:
                    return []
                out: list[tuple[float, dict[str, Any]]] = []
                for message in frame.others:  # BUY NOW, sold out, ...: this viewer's own
                    self._effects(message, now, out)
                return out
        return self.read_messages(frame.items, now)

    def _time_chat(self, times: list[tuple[float, Any]], now: float) -> None:
        """The chat of one frame timed, as :meth:`_event` times each message: from its
        send time to ``now``, and from the server's ``at`` to the wall clock now; and
        its send time."""
        lat, after, sents = self.chat_lat, self.chat_after, self.chat_sent
        assert lat is not None and after is not None and sents is not None
        wall = time.time()
        for sent, at in times:
            lat.append(round(now - sent, 4))
            after.append(round(wall - at / 1000, 4) if at is not None else None)
            sents.append(sent)

    def read_messages(self, messages: list[dict[str, Any]],
                      now: float) -> list[tuple[float, dict[str, Any]]]:
        """Every message of one frame, checked in full: ``[(delay_s, message to send),
        ...]``."""
        out: list[tuple[float, dict[str, Any]]] = []
        self._msg_gaps = []
        self._msg_skipped_to = 0
        for message in messages:
            self._one(message, now, out)
        # Missing offsets up to a skipped frame's position were chat left out of this
        # stream; any other is a lost event.
        cut = self._msg_skipped_to
        for lo, hi in self._msg_gaps:
            left_out = max(0, min(hi, cut) - lo + 1)
            self.chat_skipped += left_out
            self.gaps += (hi - lo + 1) - left_out
        self._msg_gaps, self._msg_skipped_to = None, 0
        return out

    def sent_delayed(self, now: float, message: dict[str, Any] | None = None) -> None:
        """A delayed message (the buy, or the giveaway entry) actually left now."""
        if message is not None and message.get("t") == "giveaway.enter":
            self.gw_sent_at = now
            return
        if self.buy_id is not None and self.buy_reply_at is None:
            self.buy_sent_at = now

    def chat_message(self, text: str) -> dict[str, Any]:
        return {"t": "chat.send", "id": self._new_id(), "text": text}

    def reconnect_delay(self, reason: str, rng: random.Random) -> float:
        """Seconds to wait before rejoining: the server's hint (``going_away``, already
        jittered by the server), else full jitter as centrifuge-js does it: 0.5 s plus
        a uniform draw over a window that doubles with each attempt (0.5 s, 1 s, ...,
        at most 4.5 s), so the viewers of a crashed node do not all come back at once."""
        if self.reconnect_hint_ms is not None:
            delay = self.reconnect_hint_ms / 1000.0
            self.reconnect_hint_ms = None
            return delay
        return 0.5 + rng.uniform(0.0, min(4.5, 0.5 * 2 ** self.reconnects))

    # -- internals ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _error(self, code: str) -> None:
        if self.errors is None:
            self.errors = Counter()
        self.errors[code] += 1

    def _position(self, pos: Any) -> None:
        """Check one durable event's position against the last one seen."""
        epoch, offset = position_of(pos)
        self.durable += 1
        if self.epoch is None:
            self.epoch, self.offset = epoch, offset
            return
        if epoch != self.epoch:
            self.epoch_changes += 1
            self.epoch, self.offset = epoch, offset
            return
        if offset <= self.offset:
            self.out_of_order += 1
            return
        if offset > self.offset + 1:
            if self._msg_gaps is not None:
                self._msg_gaps.append((self.offset + 1, offset - 1))
            else:
                self.gaps += offset - self.offset - 1
        self.offset = offset

    def _one(self, message: dict[str, Any], now: float,
             out: list[tuple[float, dict[str, Any]]]) -> None:
        kind = message.get("t")
        if kind == ServerType.EVENT:
            self._event(message, now, out)
        elif kind == ServerType.JOINED:
            self._joined(message, now, out)
        elif kind == ServerType.REPLY:
            if self.gw_enter_id is not None and message.get("id") == str(self.gw_enter_id) \
                    and self.gw_reply_at is None:
                self.gw_reply_at = now
                self.gw_new = bool((message.get("data") or {}).get("new"))
            elif self.buy_id is not None and message.get("id") == str(self.buy_id) \
                    and self.buy_reply_at is None:
                self.buy_reply_at = now
                self.buy_outcome = BuyOutcome.HELD
                data = message.get("data")
                if isinstance(data, dict):
                    self.hold_id = data.get("hold_id")
                    self.buyer_number = data.get("buyer_number")
        elif kind == ServerType.ERROR:
            self._command_error(message, now)
        elif kind == ServerType.PING:
            out.append((0.0, {"t": "pong"}))
        elif kind == ServerType.SKIPPED:
            self._skipped(message)
        elif kind == ServerType.GOING_AWAY:
            delay = message.get("reconnect_after_ms")
            self.reconnect_hint_ms = int(delay) if isinstance(delay, int | float) else None
        # volatile (stock, viewers), private (order.*) and pong need nothing here.

    def _skipped(self, message: dict[str, Any]) -> None:
        """Chat up to ``pos`` left out of this stream: not a gap, and the new position."""
        try:
            epoch, offset = position_of(message["pos"])
        except (KeyError, TypeError, ValueError):
            self._error("bad_skipped_frame")
            return
        if self.epoch is None or epoch != self.epoch:
            self.epoch, self.offset = epoch, offset
            return
        self._msg_skipped_to = max(self._msg_skipped_to, offset)
        if offset > self.offset:
            if self._msg_gaps is not None:
                self._msg_gaps.append((self.offset + 1, offset))
            self.offset = offset

    def _event(self, message: dict[str, Any], now: float,
               out: list[tuple[float, dict[str, Any]]]) -> None:
        self.last_event_at = now
        if message.get("pos") is not None:
            self._position(message["pos"])
        self._effects(message, now, out)

    def _effects(self, message: dict[str, Any], now: float,
                 out: list[tuple[float, dict[str, Any]]]) -> None:
        """What an event does to this viewer beside its position."""
        event = message.get("event")
        if event == CHAT:
            self.chat_seen += 1
            if self.chat_lat is not None:
                data = message.get("data") or {}
                sent = _chat_sent_at(data.get("text"))
                if sent is not None and self.chat_after is not None \
                        and self.chat_sent is not None:
                    self.chat_lat.append(round(now - sent, 4))
                    at = data.get("at")
                    self.chat_after.append(round(time.time() - at / 1000, 4)
                                           if isinstance(at, int | float) else None)
                    self.chat_sent.append(sent)
        elif event == BUY_NOW:
            if self.buy_now_at is None:
                self.buy_now_at = now
                if self.wants_to_buy and self.buy_id is None:
                    self._buy(message.get("data") or {}, now, out)
        elif event == SOLD_OUT:
            if self.sold_out_at is None:
                self.sold_out_at = now
        elif event == ENDED and self.ended_at is None:
            self.ended_at = now
        elif event == GIVEAWAY_OPENED:
            if self.gw_enter_id is None and self._wants_to_enter():
                self._enter(message.get("data") or {}, out)
        elif event == GIVEAWAY_DRAWN:
            data = message.get("data") or {}
            tickets = ",".join(str(w.get("ticket")) for w in data.get("winners") or ())
            self.gw_drawn = sys.intern(f"{data.get('giveaway_id')}:{data.get('seed')}:"
                                       f"{tickets}")

    def _spread(self, salt: int) -> float:
        """A fraction in [0, 1) fixed by the viewer's index: spreads viewers evenly."""
        return ((self.index * 2654435761 + salt) % 2**32) / 2**32

    def _wants_to_enter(self) -> bool:
        return self._spread(17) < self.config.enter_probability

    def _enter(self, data: dict[str, Any], out: list[tuple[float, dict[str, Any]]]) -> None:
        self.gw_enter_id = self._new_id()
        lo, hi = self.config.enter_delay_ms
        delay = (lo + (hi - lo) * self._spread(0)) / 1000.0
        out.append((delay, {"t": "giveaway.enter", "id": self.gw_enter_id,
                            "giveaway_id": data.get("giveaway_id")}))

    def _joined(self, message: dict[str, Any], now: float,
                out: list[tuple[float, dict[str, Any]]]) -> None:
        """``joined``: the answer to our join, or an unasked resync (no ``id``)."""
        answer = self._join_id is not None and message.get("id") == str(self._join_id)
        recovered = message.get("recovered") is True
        first = self.joins == 0 and answer
        if answer:
            self.joins += 1
            self.phase = Phase.JOINED
            if first:
                self.joined_at = now
            elif self.down is not None:
                if self.outages is None:
                    self.outages = []
                self.outages.append((self.down[0], now, recovered, self.down[1]))
                self.down = None
            if not first and self.buy_id is not None and self.buy_reply_at is None:
                self._buy_again(out)
        if not first and not recovered:
            # A snapshot instead of the missed events: whatever was missed is gone.
            self.recovery_failed += 1
        if not recovered:
            self.epoch = None  # the snapshot is the new baseline
        events = message.get("events") or ()
        pos = message.get("pos")
        if not recovered and pos is not None and events:
            # Baseline just before the first event so the events are checked too.
            epoch, _ = position_of(pos)
            self.epoch, self.offset = epoch, int(events[0]["pos"]["offset"]) - 1
        seen_before = self.buy_now_at
        for event in events:
            self._event(event, now, out)
        if seen_before is None and self.buy_now_at is not None and not first:
            self.buy_now_late = True  # missed live, recovered from history on return
        if pos is not None:
            epoch, offset = position_of(pos)
            if self.epoch is None or (not recovered and epoch == self.epoch
                                      and offset > self.offset):
                self.epoch, self.offset = epoch, offset
            elif recovered and epoch == self.epoch and offset > self.offset:
                self.gaps += offset - self.offset  # promised events that never came
                self.offset = offset
        # A BUY NOW that happened while we were away shows in the snapshot.
        snapshot = message.get("snapshot")
        if self.buy_now_at is None and isinstance(snapshot, dict) and _selling(snapshot):
            self.buy_now_at = now
            self.buy_now_late = True

    def _buy(self, data: dict[str, Any], now: float,
             out: list[tuple[float, dict[str, Any]]]) -> None:
        self.buy_id = self._new_id()
        frame: dict[str, Any] = {"t": "buy", "id": self.buy_id, "quantity": 1,
                                 "idempotency_key": f"lt-{self.user_id}-1"}
        if data.get("product_id") is not None:
            frame["product_id"] = data["product_id"]
        self._buy_product = data.get("product_id")
        # A product with variants: this viewer's pick among those with units left
        # (spread by user id), as the page's picker would offer them.
        self._buy_variant = _pick_variant(data.get("variants"), self.user_id)
        if self._buy_variant is not None:
            frame["variant_id"] = self._buy_variant
        self.buy_sent_at = now  # corrected by sent_delayed() when it leaves later
        out.append((self._buy_delay, frame))

    def _buy_again(self, out: list[tuple[float, dict[str, Any]]]) -> None:
        """The socket closed before the buy's answer came (or before the buy left):
        send it again with the same idempotency key, as a client must. The server
        answers what the first one did (``replay: true``) or, if it never got it,
        tries now: a hold is never taken twice, and never left unknown to its buyer.
        The reservation time still counts from the first send."""
        self.buy_id = self._new_id()
        self.buy_outcome = None
        self.buy_retries += 1
        frame: dict[str, Any] = {"t": "buy", "id": self.buy_id, "quantity": 1,
                                 "idempotency_key": f"lt-{self.user_id}-1"}
        if self._buy_product is not None:
            frame["product_id"] = self._buy_product
        if self._buy_variant is not None:
            frame["variant_id"] = self._buy_variant
        out.append((0.0, frame))

    def _command_error(self, message: dict[str, Any], now: float) -> None:
        code = str(message.get("code") or "error")
        mid = message.get("id")
        if self.gw_enter_id is not None and mid == str(self.gw_enter_id) \
                and self.gw_reply_at is None:
            self.gw_reply_at = now
            self.gw_code = code
            return
        if self.buy_id is not None and mid == str(self.buy_id) and self.buy_reply_at is None:
            self.buy_reply_at = now
            self.buy_code = code
            self.buy_outcome = BuyOutcome.SOLD_OUT if code == "sold_out" else \
                BuyOutcome.REJECTED
            return
        if self._join_id is not None and mid == str(self._join_id):
            self._error("join:" + code)
            return
        self._error(code if code in ErrorCode.__members__.values() else "other:" + code)

    def count_into(self, counts: Counter[str]) -> None:
        """Add this viewer to the swarm's progress counters."""
        counts[self.phase.value] += 1
        if self.joined_at is not None:
            counts["ever_joined"] += 1
        if self.buy_now_at is not None:
            counts["buy_now"] += 1
        if self.sold_out_at is not None:
            counts["sold_out_seen"] += 1
        if self.ended_at is not None:
            counts["ended_seen"] += 1
        if self.buy_sent_at is not None:
            counts["buys_sent"] += 1
        if self.buy_outcome is not None:
            counts["buy_" + self.buy_outcome.value] += 1
        if self.down is not None:
            counts["down"] += 1
        if self.gw_sent_at is not None:
            counts["entries_sent"] += 1
        if self.gw_reply_at is not None:
            counts["entries_answered"] += 1
        if self.gw_drawn is not None:
            counts["giveaway_drawn_seen"] += 1


_SCRATCH = ViewerConfig(drop_id=0, buy_probability=0.0)


def _scratch() -> Viewer:
    """A viewer that has counted nothing and times no chat (:meth:`SharedFrame.step`)."""
    return Viewer(-1, "scratch", _SCRATCH, 1.0)


def _pick_variant(variants: Any, user_id: str) -> Any:
    """The variant a buyer picks from ``drop.buy_now``'s list: among those with units
    left, one chosen by the user id (stable across retries); None without variants."""
    if not isinstance(variants, list) or not variants:
        return None
    left = [v for v in variants if isinstance(v, dict) and (v.get("remaining") or 0) > 0]
    pool = left or [v for v in variants if isinstance(v, dict)]
    if not pool:
        return None
    return pool[zlib.crc32(str(user_id).encode()) % len(pool)].get("variant_id")


def _selling(snapshot: dict[str, Any]) -> bool:
    return snapshot.get("state") == "selling" or snapshot.get("selling_product_id") is not None
