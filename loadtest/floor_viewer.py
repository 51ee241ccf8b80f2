"""The viewer of the bare-broadcast floor (:mod:`loadtest.floor`), and what a swarm of
them reports.

A floor viewer joins nothing: it connects, then times each numbered message the floor
server broadcasts (``data.k``). The swarm drives it through the same calls as a
:class:`loadtest.viewer.Viewer` (``connecting``, ``opened``, ``received``,
``sent_delayed``, ``closed``, ``count_into``), so one swarm process serves both.

On the rush floor a viewer also buys as a rehearsal viewer does
(:func:`loadtest.viewer.buy_plan`: the same draw from the swarm's seeded RNG, so the
same viewers buy after the same reaction time): once per message, the product the
message puts on sale, in the same ``buy`` frame, and it reads the reply the same way.

On the chat floor a viewer sends chat as a rehearsal viewer does (the same
``chat.send`` frame, the same text with its send time: :func:`loadtest.viewer.chat_text`),
counts every ``chat.message`` it gets, filed under the interval the server batched it
under (``data.batch_ms``), and, on every Nth viewer as in the rehearsal
(``chat_sample``), times each from its send time to the frame's arrival. What a frame
holds is worked out once per process (:func:`_chat_of`): a batch reaches every viewer
of the process with the same bytes, as the rehearsal's viewers read chat
(:func:`loadtest.viewer.shared_frame`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from loadtest.viewer import (
    BuyOutcome,
    Phase,
    UndecodableFrame,
    _chat_sent_at,
    buy_plan,
    decode_shared,
)
from realtime.protocol import Format, encode

__all__ = ["FloorViewer", "summarize_floor"]

CHAT = "chat.message"
_last_chat: tuple[Any, Any] = (None, None)  # (frame bytes, _chat_of's answer)


def _chat_of(data: bytes | str,
             messages: list[dict[str, Any]]) -> tuple[dict[int, int], list[tuple[int, float]]]:
    """The chat messages of one frame: how many per interval, and each timed one's
    ``(interval, send time)``; remembered for the next viewer of the same frame."""
    global _last_chat
    if _last_chat[0] is not None and data == _last_chat[0]:
        return _last_chat[1]
    counts: Counter[int] = Counter()
    sent: list[tuple[int, float]] = []
    for message in messages:
        if message.get("t") != "event" or message.get("event") != CHAT:
            continue
        body = message.get("data") or {}
        interval = body.get("batch_ms")
        if not isinstance(interval, int):
            continue
        counts[interval] += 1
        at = _chat_sent_at(body.get("text"))
        if at is not None:
            sent.append((interval, at))
    found = (dict(counts), sent)
    _last_chat = (data, found)
    return found


class FloorViewer:
    """A viewer of the bare-broadcast floor (loadtest.floor): it joins nothing and
    times each numbered message the floor server broadcasts (``data.k``); with a buy
    probability (the rush floor) it buys the product of each message it sees."""

    __slots__ = ("_buy_delay", "_chat_n", "arrivals", "buy_id", "buy_lat", "buy_sent_at",
                 "buys", "chat_counts", "chat_lat", "format", "index", "last_k", "phase",
                 "user_id", "wants_to_buy")

    def __init__(self, index: int, user_id: str = "", draw: float = 1.0,
                 buy_probability: float = 0.0, buy_delay_ms: tuple[float, float] = (0, 200),
                 encoding: str = "msgpack", chat_timed: bool = False) -> None:
        self.index = index
        self.user_id = user_id or f"floor-{index}"
        self.phase = Phase.IDLE
        self.arrivals: list[tuple[int, float]] = []
        self.wants_to_buy, self._buy_delay = buy_plan(draw, buy_probability, buy_delay_ms)
        self.format = Format.JSON if encoding == "json" else Format.MSGPACK
        self.last_k = -1  # the last message this viewer bought from
        self.buy_id: int | None = None  # the buy awaiting its reply (its id: k + 1)
        self.buy_sent_at: float | None = None
        self.buys: Counter[str] = Counter()  # "sent" and each BuyOutcome
        self.buy_lat: list[float] = []  # buy sent -> reply, seconds
        self._chat_n = 0
        self.chat_counts: dict[int, int] = {}  # chat messages got, by batch interval
        # (interval, send -> arrival in seconds) of each chat message, timed viewers only
        self.chat_lat: list[tuple[int, float]] | None = [] if chat_timed else None

    @property
    def is_open(self) -> bool:
        return self.phase is Phase.JOINED

    is_joined = is_open

    def encode(self, message: dict[str, Any]) -> bytes | str:
        return encode(message, self.format)

    def connecting(self, now: float) -> None:
        self.phase = Phase.CONNECTING

    def opened(self, now: float) -> list[dict[str, Any]]:
        self.phase = Phase.JOINED  # connected is all the floor asks
        return []

    def closed(self, code: int | None, reason: str, now: float) -> None:
        self.phase = Phase.CLOSED
        if self.buy_id is not None:
            self.buys[BuyOutcome.NO_REPLY.value] += 1
            self.buy_id = None

    def received(self, data: bytes | str, now: float) -> list[tuple[float, dict[str, Any]]]:
        try:
            messages = decode_shared(data)  # as the rehearsal's viewers read
        except UndecodableFrame:
            return []
        out: list[tuple[float, dict[str, Any]]] = []
        counts, sent = _chat_of(data, messages)
        if counts:
            for interval, n in counts.items():
                self.chat_counts[interval] = self.chat_counts.get(interval, 0) + n
            if self.chat_lat is not None:
                self.chat_lat.extend((interval, round(now - at, 4)) for interval, at in sent)
            if len(messages) == sum(counts.values()):
                return out  # chat only: nothing else to read
        for message in messages:
            kind = message.get("t")
            if kind == "reply" or kind == "error":
                self._answered(message, now)
                continue
            body = message.get("data") or {}
            k = body.get("k")
            if isinstance(k, int):
                self.arrivals.append((k, round(now, 4)))
                if self.wants_to_buy:
                    self._buy(k, body.get("product_id"), now, out)
        return out

    def chat_message(self, text: str) -> dict[str, Any]:
        """The rehearsal viewer's chat frame (:meth:`loadtest.viewer.Viewer.chat_message`)."""
        self._chat_n += 1
        return {"t": "chat.send", "id": f"c{self._chat_n}", "text": text}

    def sent_delayed(self, now: float, message: dict[str, Any] | None = None) -> None:
        """The buy actually left now (the swarm held it for the reaction time)."""
        if message is not None and message.get("id") == self.buy_id:
            self.buy_sent_at = now

    def _buy(self, k: int, product_id: Any, now: float,
             out: list[tuple[float, dict[str, Any]]]) -> None:
        """One buy per message, as a rehearsal viewer buys BUY NOW's product."""
        if self.buy_id is not None or k <= self.last_k:
            return
        self.last_k = k
        self.buy_id = k + 1
        self.buy_sent_at = now  # corrected by sent_delayed() when it leaves later
        self.buys["sent"] += 1
        frame: dict[str, Any] = {"t": "buy", "id": self.buy_id, "quantity": 1,
                                 "idempotency_key": f"lt-{self.user_id}-{k + 1}"}
        if product_id is not None:
            frame["product_id"] = product_id
        out.append((self._buy_delay, frame))

    def _answered(self, message: dict[str, Any], now: float) -> None:
        if self.buy_id is None or message.get("id") != str(self.buy_id):
            return
        if message.get("t") == "reply":
            outcome = BuyOutcome.HELD
        elif message.get("code") == "sold_out":
            outcome = BuyOutcome.SOLD_OUT
        else:
            outcome = BuyOutcome.REJECTED
        self.buys[outcome.value] += 1
        if self.buy_sent_at is not None:
            self.buy_lat.append(round(now - self.buy_sent_at, 4))
        self.buy_id = None

    def count_into(self, counts: Counter[str]) -> None:
        counts[self.phase.value] += 1
        if self.phase is Phase.JOINED:
            counts["ever_joined"] += 1
        counts["floor_seen"] += len(self.arrivals)
        if self.chat_counts:
            counts["chat_seen"] += sum(self.chat_counts.values())
        if self.buys:
            counts["buys_sent"] += self.buys["sent"]
            for outcome in BuyOutcome:
                counts["buy_" + outcome.value] += self.buys[outcome.value]


def summarize_floor(viewers: Iterable[FloorViewer]) -> dict[str, Any]:
    """Arrival times by message number ``k``; on the rush floor the buys' outcomes and
    their reply times; on the chat floor, by batch interval (a string key), how many
    viewers got how many chat messages (``{interval: {count: viewers}}``) and the timed
    viewers' latencies."""
    arrivals: dict[str, list[float]] = {}
    joined = 0
    buys: Counter[str] = Counter()
    buy_lat: list[float] = []
    chat_counts: dict[str, Counter[int]] = {}
    chat_lat: dict[str, list[float]] = {}
    for v in viewers:
        joined += 1 if v.phase is Phase.JOINED else 0
        for k, t in v.arrivals:
            arrivals.setdefault(str(k), []).append(t)
        buys.update(v.buys)
        buy_lat.extend(v.buy_lat)
        for interval, n in v.chat_counts.items():
            chat_counts.setdefault(str(interval), Counter())[n] += 1
        for interval, lat in v.chat_lat or ():
            chat_lat.setdefault(str(interval), []).append(lat)
    out: dict[str, Any] = {"floor_arrivals": arrivals, "totals": {"joined": joined},
                           "floor_buys": dict(buys), "floor_buy_latency": buy_lat}
    if chat_counts or chat_lat:
        out["chat_floor_counts"] = {k: dict(c) for k, c in chat_counts.items()}
        out["chat_floor_latency"] = chat_lat
    return out
