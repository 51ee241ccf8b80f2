"""What a swarm reports of its viewers (:class:`loadtest.viewer.Viewer`): raw times and
totals.

:func:`summarize_viewers` turns a swarm's viewers into the report it sends the
rehearsal when asked: each viewer's join, BUY NOW and reservation times (seconds,
rounded to 0.1 ms), buy outcomes and error codes, last positions, chat latencies (with
each timed message's send time), the last buy reply's time, and totals (gaps, resumes,
reconnects, outages). The rehearsal adds every swarm's report up
(:mod:`loadtest.figures`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from loadtest.viewer import BuyOutcome, Viewer

__all__ = ["summarize_viewers"]


def summarize_viewers(viewers: Iterable[Viewer]) -> dict[str, Any]:
    """What a swarm sends back: raw times (rounded to 0.1 ms) and totals."""
    joined: list[float] = []
    connect: list[float] = []
    buy_now: list[float] = []
    reservations: list[float] = []
    held_users: list[str] = []
    outcomes: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    last_offsets: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    chat_lat: list[float] = []
    chat_after: list[float | None] = []  # None: the message carried no ``at``
    chat_sent: list[float] = []
    last_reply: float | None = None  # the last buy reply (the rush's end)
    holds: list[list[Any]] = []
    outages: list[list[Any]] = []
    entrants: list[str] = []  # users whose giveaway entry was answered: entered
    entry_codes: Counter[str] = Counter()
    entry_s: list[float] = []  # entry sent -> answer
    entry_answered_at: list[float] = []
    drawn_seen: Counter[str] = Counter()  # "giveaway:seed:tickets" -> viewers shown it
    for v in viewers:
        if v.gw_reply_at is not None:
            entry_answered_at.append(round(v.gw_reply_at, 4))
            if v.gw_sent_at is not None:
                entry_s.append(round(v.gw_reply_at - v.gw_sent_at, 4))
            if v.gw_code is None:
                entrants.append(v.user_id)
                totals["entries_new" if v.gw_new else "entries_repeat"] += 1
            else:
                entry_codes[v.gw_code] += 1
        totals["entries_sent"] += 1 if v.gw_sent_at is not None else 0
        if v.gw_drawn is not None:
            drawn_seen[v.gw_drawn] += 1
        if v.chat_lat and v.chat_after is not None and v.chat_sent is not None:
            chat_lat.extend(v.chat_lat)
            chat_after.extend(v.chat_after)
            chat_sent.extend(v.chat_sent)
        if v.buy_reply_at is not None and (last_reply is None or v.buy_reply_at > last_reply):
            last_reply = v.buy_reply_at
        if v.joined_at is not None:
            joined.append(round(v.joined_at, 4))
            if v.connect_started is not None and v.connected_at is not None:
                connect.append(round(v.joined_at - v.connect_started, 4))
        if v.buy_now_at is not None and not v.buy_now_late:
            buy_now.append(round(v.buy_now_at, 4))
        totals["buy_now_late"] += 1 if v.buy_now_late else 0
        if v.buy_outcome is not None:
            outcomes[v.buy_outcome.value] += 1
            if v.buy_outcome is BuyOutcome.HELD:
                held_users.append(v.user_id)
                holds.append([v.user_id, v.hold_id, v.buyer_number])
        if v.outages:
            outages.extend([round(a, 4), round(b, 4), rec, told]
                           for a, b, rec, told in v.outages)
        totals["down_at_report"] += 1 if v.down is not None else 0
        totals["buy_retries"] += v.buy_retries
        if v.buy_code:
            codes[v.buy_code] += 1
        if v.buy_reply_at is not None and v.buy_sent_at is not None:
            reservations.append(round(v.buy_reply_at - v.buy_sent_at, 4))
        if v.errors:
            errors.update(v.errors)
        if v.epoch is not None:
            last_offsets[f"{v.epoch}:{v.offset}"] += 1
        totals["gaps"] += v.gaps
        totals["viewers_with_gaps"] += 1 if v.gaps else 0
        totals["out_of_order"] += v.out_of_order
        totals["epoch_changes"] += v.epoch_changes
        totals["recovery_failed"] += v.recovery_failed
        totals["durable_events"] += v.durable
        totals["chat_seen"] += v.chat_seen
        totals["chat_skipped"] += v.chat_skipped
        totals["reconnects"] += v.reconnects
        totals["joined"] += 1 if v.joined_at is not None else 0
        totals["open_at_report"] += 1 if v.is_open else 0
        totals["sold_out_seen"] += 1 if v.sold_out_at is not None else 0
        totals["ended_seen"] += 1 if v.ended_at is not None else 0
        totals["wants_to_buy"] += 1 if v.wants_to_buy else 0
    return {
        "joined_at": joined, "connect_s": connect, "buy_now_at": buy_now,
        "reservation_s": reservations, "held_users": held_users, "holds": holds,
        "outages": outages,
        "buy_outcomes": dict(outcomes), "buy_codes": dict(codes), "errors": dict(errors),
        "last_positions": dict(last_offsets), "totals": dict(totals),
        # one entry per timed message, in the same order in all three lists
        "chat_latency_s": chat_lat,
        "chat_after_post_s": chat_after,
        "chat_sent_at": chat_sent,
        "last_buy_reply_at": last_reply,
        "giveaway": {"entrants": entrants, "entry_codes": dict(entry_codes),
                     "entry_s": entry_s, "answered_at": entry_answered_at,
                     "drawn_seen": dict(drawn_seen)},
    }
