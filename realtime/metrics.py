"""Prometheus metrics of the gateway (names carry their unit)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from dropserver.observability import tally

CONNECTIONS = Gauge("dropserver_ws_connections", "Open WebSocket connections.",
                    multiprocess_mode="livesum")
ROOMS = Gauge("dropserver_ws_drops_subscribed", "Drops this process is subscribed to.",
              multiprocess_mode="livesum")
CLOSES = Counter("dropserver_ws_closes_total", "Connections closed by the server, by code.",
                 ["code"])
SLOW_CLOSES = Counter("dropserver_ws_slow_closes_total",
                      "Connections closed because they could not keep up (4008).")
REFUSED = Counter("dropserver_ws_refused_total", "Sockets told to retry later (overload).")
FRAMES_IN = Counter("dropserver_ws_frames_received_total", "Client frames, by type.",
                    ["type"])
_frames_in: dict[str, Any] = {}  # type -> child; types are the protocol's, a few
HEARTBEAT_PINGS = Counter("dropserver_ws_pings_total",
                          "Heartbeat pings sent, by how: in the same write as a message "
                          "the socket was getting (with_data) or alone.", ["how"])
ERRORS = Counter("dropserver_ws_errors_total", "Error frames sent, by code.", ["code"])
FANOUT_SECONDS = Histogram(
    "dropserver_fanout_seconds", "Time to hand one publication to every local socket.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
FANOUT_MESSAGES = Counter("dropserver_fanout_messages_total",
                          "Messages handed to local sockets.", ["kind"])
COALESCED = Counter("dropserver_coalesced_total",
                    "Coalescable events merged or dropped, by where.", ["where"])
RESUBSCRIBES = Counter("dropserver_pubsub_resubscribes_total",
                       "Times the pub/sub connection was lost and re-established.")
GAPS = Counter("dropserver_history_gaps_total",
               "Gaps in a drop's live stream, by outcome (filled from history, resync).",
               ["outcome"])
RECOVERIES = Counter("dropserver_recoveries_total", "Client resumes, by outcome.",
                     ["outcome"])
CHAT_MESSAGES = Counter("dropserver_chat_messages_total", "Chat messages accepted.")
BATCHED = Counter("dropserver_fanout_batched_events_total",
                  "Durable events that left in a batch with others (one write per socket).")


def frame_in(kind: str) -> None:
    """Count one client frame of ``kind`` (a known frame type or command, or
    "invalid"): the labelled child is looked up once, and the count is batched
    (:func:`dropserver.observability.tally`)."""
    child = _frames_in.get(kind)
    if child is None:
        child = _frames_in[kind] = FRAMES_IN.labels(kind)
    tally(child)
CHAT_BATCHES = Counter("dropserver_chat_batches_total",
                       "Chat batches sent to a big room's sockets (one write per socket).")
CHAT_SAMPLED_OUT = Counter("dropserver_chat_sampled_out_total",
                           "Chat messages left out of a big room's batches (a fair sample "
                           "kept; every message stays in history).")
CHAT_SHED = Counter("dropserver_chat_shed_total",
                    "Queued chat messages a slow socket did not get (replaced by a "
                    "`skipped` frame so that a drop event goes first).")
CHAT_THINNED = Counter("dropserver_chat_thinned_total",
                       "Chat messages left out of a big room's stream in front of a drop "
                       "event (the chat quiet, DROPSERVER_CHAT_QUIET_MS; every message "
                       "stays in history).")
CHAT_REFUSED = Counter("dropserver_chat_refused_total",
                       "Chat posts refused (rate_limited) because the process already had "
                       "its bound of posts in flight and waiting (realtime.chat.PostGate).")
