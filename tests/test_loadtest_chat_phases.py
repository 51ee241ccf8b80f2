"""Chat delivery split by when each message was posted (loadtest.figures.chat_by_phase),
and the per-message times a swarm reports for it (loadtest.viewer_summary)."""

from __future__ import annotations

import json

from loadtest.figures import chat_by_phase
from loadtest.viewer import Viewer, ViewerConfig, chat_text
from loadtest.viewer_summary import summarize_viewers
from realtime.protocol import Format, encode, event_frame


def test_chat_is_split_by_post_time_and_by_side_of_the_server() -> None:
    # BUY NOW requested at 100.0; the last buy reply at 104.0.
    sent = [90.0, 95.0, 99.999, 100.0, 102.0, 104.0, 104.001, 110.0]
    latency = [0.5, 0.7, 0.9, 4.0, 6.0, 3.0, 1.0, 1.2]
    after = [0.4, 0.5, 0.6, 1.0, 2.0, None, 0.8, 0.2]
    out = chat_by_phase(sent, latency, after, t_buy_now=100.0, rush_end=104.0)
    assert out["rush_s"] == 4.0
    before, rush, later = out["before"], out["rush"], out["after"]
    assert before["latency"]["count"] == 3  # the boundary: 100.0 is the rush's
    assert (before["latency"]["p50_ms"], before["latency"]["p99_ms"]) == (700.0, 900.0)
    assert before["after_post_latency"]["p99_ms"] == 600.0
    # send to acceptance is the rest: 0.1, 0.2, 0.3 s
    assert [before["to_server_latency"][k] for k in ("min_ms", "p50_ms", "p99_ms")] \
        == [100.0, 200.0, 300.0]
    assert rush["latency"]["count"] == 3  # 100.0, 102.0 and 104.0 (the last reply's own)
    assert (rush["latency"]["p50_ms"], rush["latency"]["p99_ms"]) == (4000.0, 6000.0)
    # the message without the server's "at" is timed, but split only where it can be
    assert rush["to_server_latency"]["count"] == rush["after_post_latency"]["count"] == 2
    assert (rush["to_server_latency"]["p50_ms"], rush["to_server_latency"]["p99_ms"]) \
        == (3000.0, 4000.0)
    assert later["latency"]["count"] == 2
    assert later["latency"]["p99_ms"] == 1200.0
    assert later["to_server_latency"]["p99_ms"] == 1000.0
    assert sum(out[p]["latency"]["count"] for p in ("before", "rush", "after")) == len(sent)


def test_no_buy_reply_leaves_an_empty_rush() -> None:
    out = chat_by_phase([1.0, 3.0], [0.1, 0.2], [0.05, 0.1], t_buy_now=2.0, rush_end=None)
    assert out["rush_s"] == 0.0
    assert [out[p]["latency"]["count"] for p in ("before", "rush", "after")] == [1, 0, 1]
    assert out["rush"]["latency"]["p99_ms"] is None  # nothing measured, not a zero


def _wire(frame: dict | list) -> bytes:
    return encode(frame, Format.MSGPACK)  # what the server sends


def test_a_swarm_reports_each_timed_messages_send_time_beside_its_latencies() -> None:
    cfg = ViewerConfig(drop_id=42, buy_probability=0.0, chat_sample=2)
    viewers = [Viewer(i, f"lt-{i}", cfg, 0.5) for i in range(4)]
    for v in viewers:
        [join] = v.opened(1.0)
        v.received(_wire({"t": "joined", "id": str(join["id"]), "drop_id": 42,
                          "recovered": False, "pos": {"epoch": "e1", "offset": 3},
                          "events": [], "snapshot": {"state": "live"}}), 1.1)
    one = _wire(event_frame("chat.message", {"text": chat_text(10.0, "s1")}, "e1", 4))
    batch = _wire([event_frame("chat.message", {"text": chat_text(sent, f"s{o}"),
                                                "at": 1_000_000}, "e1", o)
                   for o, sent in ((5, 11.0), (6, 11.5))])
    for v in viewers:
        v.received(bytes(one), 10.25)
        v.received(bytes(batch), 12.0)
    viewers[1].buy_reply_at, viewers[3].buy_reply_at = 13.5, 12.5
    report = summarize_viewers(viewers)
    json.dumps(report)  # it crosses a pipe
    assert report["chat_sent_at"] == [10.0, 11.0, 11.5] * 2  # viewers 0 and 2 time chat
    assert report["chat_latency_s"] == [0.25, 1.0, 0.5] * 2
    after = report["chat_after_post_s"]
    assert len(after) == 6 and after[0] is None and after[3] is None
    assert all(isinstance(x, float) for i, x in enumerate(after) if i % 3)
    assert report["last_buy_reply_at"] == 13.5
