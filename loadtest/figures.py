"""A rehearsal's figures: what every swarm reported, merged into the result a report
shows.

:func:`compose` adds up the swarms' raw times and counts (joins, BUY NOW arrivals,
reservations, positions, chat) into latency summaries and totals (chat's also by when
each message was posted: :func:`chat_by_phase`), works out the events
lost at the tail (a viewer whose last position is behind the newest anyone saw), puts
the server's memory and CPU beside them, and ends with the verdict
(:mod:`loadtest.verdict`). The result is the JSON that :mod:`loadtest.report` draws.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loadtest import verdict
from loadtest.stats import histogram, summarize

if TYPE_CHECKING:
    from loadtest.rehearse import RehearsalConfig

__all__ = ["CHAT_PHASES", "chat_by_phase", "compose"]

# When a timed chat message was posted (its send time): before the creator's BUY NOW
# request, in the rush (from that request to the last buy reply any viewer got), after.
CHAT_PHASES = ("before", "rush", "after")


def chat_by_phase(sent: list[float], latency: list[float], after_post: list[float | None],
                  *, t_buy_now: float, rush_end: float | None) -> dict[str, Any]:
    """Chat delivery split by when each message was posted (:data:`CHAT_PHASES`).

    ``sent``, ``latency`` and ``after_post`` hold one entry per timed message, in the
    same order: its send time (monotonic), send to delivery, and server acceptance
    (``at``) to delivery (``None`` without ``at``). ``t_buy_now``: the creator's BUY NOW
    request (monotonic); ``rush_end``: the last buy reply (``None``: no buy, an empty
    rush). Each phase: ``latency`` (send to delivery), and of the messages with an
    ``at``, ``to_server_latency`` (send to acceptance: the sender's sending and the
    server's reading and checks) and ``after_post_latency`` (acceptance to delivery:
    publication, batching, fan-out, the viewer's reading). ``rush_s``: the rush's
    length, from the BUY NOW request.
    """
    end = t_buy_now if rush_end is None else max(rush_end, t_buy_now)
    parts: dict[str, tuple[list[float], list[float], list[float]]] = {
        phase: ([], [], []) for phase in CHAT_PHASES}
    for at, lat, after in zip(sent, latency, after_post, strict=True):
        phase = "before" if at < t_buy_now else "rush" if at <= end else "after"
        lats, to_server, after_ = parts[phase]
        lats.append(lat)
        if after is not None:
            # wall clock (after) beside monotonic (lat): differences, so both hold
            to_server.append(lat - after)
            after_.append(after)
    out: dict[str, Any] = {"rush_s": round(end - t_buy_now, 3)}
    for phase, (lats, to_server, after_) in parts.items():
        out[phase] = {"latency": summarize(lats), "to_server_latency": summarize(to_server),
                      "after_post_latency": summarize(after_)}
    return out


def compose(cfg: RehearsalConfig, reports: list[dict[str, Any]], audit: dict[str, Any], *,
            t_buy_now: float, joined: int, connect_s: float, baseline: Any,
            after_connect: Any, cpu_window: tuple[Any, Any], watch: Any,
            cpu_samples: list[float], timeline: list[dict[str, Any]],
            phases: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The result of a run: every swarm's raw times and counts merged into the
    figures the report shows, with the audit, the server's memory and CPU
    (``baseline``, ``after_connect`` and ``cpu_window`` are samples of ``watch``),
    and the verdict (:func:`loadtest.verdict.judge`)."""
    from loadtest.procstat import cpu_percent

    buy_now_lat = [t - t_buy_now for r in reports for t in r["buy_now_at"]]
    reservations = [x for r in reports for x in r["reservation_s"]]
    connect_lat = [x for r in reports for x in r["connect_s"]]
    joined_at = sorted(t for r in reports for t in r["joined_at"])
    totals: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    connect_errors: Counter[str] = Counter()
    close_reasons: Counter[str] = Counter()
    last_positions: Counter[str] = Counter()
    for r in reports:
        totals.update(r["totals"])
        outcomes.update(r["buy_outcomes"])
        codes.update(r["buy_codes"])
        errors.update(r["errors"])
        connect_errors.update(r["connect_errors"])
        close_reasons.update(r["close_reasons"])
        last_positions.update(r["last_positions"])
    # The missing tail: a viewer whose last position is behind the newest one seen
    # by anyone missed the events in between (same epoch), or the whole epoch.
    tail_lost = 0
    newest: tuple[str, int] | None = None
    parsed = []
    for key, count in last_positions.items():
        epoch, _, off = key.rpartition(":")
        parsed.append((epoch, int(off), count))
        if newest is None or int(off) > newest[1]:
            newest = (epoch, int(off))
    for epoch, off, count in parsed:
        if newest is not None and (epoch, off) != newest:
            tail_lost += count * (newest[1] - off if epoch == newest[0] else newest[1])
    lost = totals["gaps"] + tail_lost
    # From the first socket's turn, not the first join: the seconds the first
    # sockets waited for their joins belong to the ramp.
    starts = [r["ramp_started_at"] for r in reports if r.get("ramp_started_at")]
    first = min(starts) if starts else (joined_at[0] if joined_at else 0.0)
    ramp = (joined_at[-1] - first) if joined_at else 0.0
    bn = summarize(buy_now_lat)
    chat_lat = [x for r in reports for x in r.get("chat_latency_s", ())]
    chat_after_all = [x for r in reports for x in r.get("chat_after_post_s", ())]
    chat_after = [x for x in chat_after_all if x is not None]
    chat_sent = [x for r in reports for x in r.get("chat_sent_at", ())]
    replies = [r["last_buy_reply_at"] for r in reports if r.get("last_buy_reply_at")]
    chat_phases = chat_by_phase(chat_sent, chat_lat, chat_after_all, t_buy_now=t_buy_now,
                                rush_end=max(replies) if replies else None)
    joined_n = max(totals["joined"], 1)
    server: dict[str, Any] = {"measured": watch is not None}
    if baseline is not None and after_connect is not None:
        delta = after_connect.rss_bytes - baseline.rss_bytes
        server.update({
            "workers": len(watch.pids),
            "rss_before_mib": round(baseline.rss_bytes / 2**20, 1),
            "rss_connected_mib": round(after_connect.rss_bytes / 2**20, 1),
            "rss_per_connection_kib": round(delta / max(joined, 1) / 1024, 1),
            "cpu_avg_percent": round(sum(cpu_samples) / len(cpu_samples), 1)
            if cpu_samples else None,
            "cpu_peak_percent": max(cpu_samples) if cpu_samples else None,
            "cpu_rush_percent": cpu_percent(*cpu_window) if all(cpu_window) else None,
            # CPU seconds from BUY NOW's request through the rush (a floor's: server_cpu_s)
            "cpu_rush_s": round(cpu_window[1].cpu_seconds - cpu_window[0].cpu_seconds, 2)
            if all(cpu_window) else None,
        })
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "config": {"viewers": cfg.viewers, "stock": cfg.stock,
                   "server_workers": cfg.resolved_workers() if not cfg.target else None,
                   "swarm_processes": cfg.resolved_swarms(), "target": cfg.target
                   or "local", "connect_rate": cfg.connect_rate,
                   "buy_probability": cfg.buy_probability,
                   "buy_delay_ms": list(cfg.buy_delay_ms), "encoding": cfg.encoding,
                   "p99_budget_ms": cfg.p99_budget_ms, "chat_rate": cfg.chat_rate,
                   "chat_messages": cfg.chat_messages, "countdown_s": cfg.countdown_s,
                   "countdown_jitter_s": cfg.countdown_jitter_s,
                   "countdown_drawn_s": cfg.countdown_drawn_s,
                   "server_env": cfg.server_env, "floor": cfg.floor,
                   "chat_floor_intervals": list(cfg.chat_floor_intervals),
                   "chat_floor_s": cfg.chat_floor_s,
                   "fault": ({"what": cfg.fault.describe(), "after_s": cfg.fault.after_s,
                              "budget_s": cfg.fault.budget_s} if cfg.fault else None)},
        "connections": {
            "target": cfg.viewers, "joined": totals["joined"],
            "open_at_end": totals["open_at_report"], "failed": sum(connect_errors.values()),
            "connect_errors": dict(connect_errors.most_common(10)),
            "closes": dict(close_reasons.most_common(10)),
            "reconnects": totals["reconnects"],
            "ramp_seconds": round(connect_s, 2),
            "first_socket_to_last_join_s": round(ramp, 2),
            "rate_per_s": round(totals["joined"] / ramp, 1) if ramp > 0 else None,
            "asked_rate_per_s": (int(cfg.connect_rate)
                                 if float(cfg.connect_rate).is_integer()
                                 else cfg.connect_rate),
            "join_latency": summarize(connect_lat),
        },
        # late: learnt after a reconnect (history or snapshot), not live
        "buy_now": {"seen": len(buy_now_lat), "late_via_snapshot": totals["buy_now_late"],
                    "latency": bn, "histogram_bucket_ms": verdict.bucket_ms(bn),
                    "histogram_ms": histogram(buy_now_lat, verdict.bucket_ms(bn))},
        "positions": {"lost": lost, "gaps": totals["gaps"], "tail_lost": tail_lost,
                      "viewers_with_gaps": totals["viewers_with_gaps"],
                      "out_of_order": totals["out_of_order"],
                      "epoch_changes": totals["epoch_changes"],
                      "recovery_failed": totals["recovery_failed"],
                      "durable_events_received": totals["durable_events"],
                      "newest": list(newest) if newest else None},
        "reservations": {"wanted": totals["wants_to_buy"],
                         "sent": sum(outcomes.values()),
                         "held": outcomes.get("held", 0),
                         "sold_out": outcomes.get("sold_out", 0),
                         "rejected": outcomes.get("rejected", 0),
                         "no_reply": outcomes.get("no_reply", 0),
                         "codes": dict(codes), "latency": summarize(reservations)},
        "chat": {"rate_asked_per_s": cfg.chat_rate,
                 "sent": sum(int(r.get("chat_sent", 0)) for r in reports),
                 "received_per_viewer": round(totals["chat_seen"] / joined_n, 1),
                 "left_out_per_viewer": round(totals["chat_skipped"] / joined_n, 1),
                 "latency": summarize(chat_lat),
                 # the part from the server's acceptance on (publication, batch, fan-out)
                 "after_post_latency": summarize(chat_after),
                 # the part before it: the sender's sending, the server's reading
                 "to_server_latency": summarize(
                     [lat - after for lat, after in zip(chat_lat, chat_after_all,
                                                        strict=True) if after is not None]),
                 # by when each message was posted: before BUY NOW, in the rush, after
                 "phases": chat_phases},
        "protocol_errors": dict(errors),
        # [user, hold id, buyer number] of every hold a buyer was told of
        "holds": [h for r in reports for h in r.get("holds", ())],
        "audit": audit,
        "server": server,
        "timeline": timeline,
        "phases": phases,
        "notes": notes,
    }
    result["failures"] = verdict.judge(result, cfg)
    result["passed"] = not result["failures"]
    return result
