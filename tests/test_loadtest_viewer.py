"""loadtest.viewer: the pure viewer core (frames in, frames out; no I/O)."""

from __future__ import annotations

import json

import msgpack

from loadtest import viewer as viewer_mod
from loadtest.viewer import BuyOutcome, Phase, Viewer, ViewerConfig, decode_server, decode_shared
from realtime.protocol import Format, encode, event_frame


def _viewer(buy: bool = True, encoding: str = "msgpack") -> Viewer:
    cfg = ViewerConfig(drop_id=42, encoding=encoding, buy_probability=1.0 if buy else 0.0,
                       buy_delay_ms=(0, 0))
    return Viewer(7, "lt-7", cfg, draw=0.5)


def _wire(frame: dict) -> bytes:
    return encode(frame, Format.MSGPACK)  # what the server sends


def _join(v: Viewer, offset: int = 3, **extra) -> None:
    [join] = v.opened(1.0)
    frame = {"t": "joined", "id": str(join["id"]), "drop_id": 42, "recovered": False,
             "pos": {"epoch": "e1", "offset": offset}, "events": [],
             "snapshot": {"state": "live"}, **extra}
    assert v.received(_wire(frame), 1.1) == []


def test_join_frame_and_subprotocol() -> None:
    v = _viewer(encoding="json")
    assert v.subprotocols() == ["dropserver.json.v1"]
    [join] = v.opened(1.0)
    assert join == {"t": "join", "id": 1, "drop_id": 42}
    assert json.loads(v.encode(join)) == join
    assert v.phase is Phase.JOINING


def test_events_in_order_count_no_gap() -> None:
    v = _viewer(buy=False)
    _join(v)
    for off in (4, 5, 6):
        v.received(_wire(event_frame("chat.message", {}, "e1", off)), 2.0)
    assert (v.gaps, v.out_of_order, v.durable, v.offset) == (0, 0, 3, 6)


def test_skipped_offsets_are_gaps_and_repeats_out_of_order() -> None:
    v = _viewer(buy=False)
    _join(v)
    v.received(_wire(event_frame("chat.message", {}, "e1", 6)), 2.0)  # 4, 5 missing
    v.received(_wire(event_frame("chat.message", {}, "e1", 5)), 2.1)  # late
    assert (v.gaps, v.out_of_order, v.offset) == (2, 1, 6)


def test_buy_now_triggers_buy_and_reply_times_it() -> None:
    v = _viewer()
    _join(v)
    out = v.received(_wire(event_frame("drop.buy_now", {"product_id": 9}, "e1", 4)), 5.0)
    assert v.buy_now_at == 5.0
    [(delay, buy)] = out
    assert delay == 0 and buy["t"] == "buy" and buy["product_id"] == 9
    assert buy["idempotency_key"] == "lt-lt-7-1"
    v.received(_wire({"t": "reply", "id": str(buy["id"]), "data": {"hold_id": "h"}}), 5.02)
    assert v.buy_outcome is BuyOutcome.HELD
    assert round(v.buy_reply_at - v.buy_sent_at, 3) == 0.02


def test_sold_out_error_is_an_outcome_not_a_protocol_error() -> None:
    v = _viewer()
    _join(v)
    [(_, buy)] = v.received(_wire(event_frame("drop.buy_now", {"product_id": 9}, "e1", 4)),
                            5.0)
    v.received(_wire({"t": "error", "id": str(buy["id"]), "code": "sold_out",
                      "message": "gone"}), 5.1)
    assert v.buy_outcome is BuyOutcome.SOLD_OUT and v.errors is None
    v.received(_wire({"t": "error", "code": "rate_limited", "message": "slow down"}), 5.2)
    assert v.errors == {"rate_limited": 1}


def test_resume_sends_since_and_recovered_events_are_checked() -> None:
    v = _viewer(buy=False)
    _join(v, offset=10)
    v.closed(1012, "restart", 3.0)
    [join] = v.opened(4.0)
    assert join["since"] == {"epoch": "e1", "offset": 10}
    events = [event_frame("chat.message", {}, "e1", 11), event_frame("chat.message", {}, "e1", 12)]
    v.received(_wire({"t": "joined", "id": str(join["id"]), "recovered": True,
                      "pos": {"epoch": "e1", "offset": 12}, "events": events}), 4.1)
    assert (v.gaps, v.recovery_failed, v.offset, v.joins) == (0, 0, 12, 2)


def test_unrecoverable_resume_is_counted() -> None:
    v = _viewer(buy=False)
    _join(v, offset=10)
    [join] = v.opened(4.0)
    v.received(_wire({"t": "joined", "id": str(join["id"]), "recovered": False,
                      "pos": {"epoch": "e2", "offset": 3}, "snapshot": {"state": "live"}}),
               4.1)
    assert v.recovery_failed == 1 and (v.epoch, v.offset) == ("e2", 3)


def test_ping_is_answered_and_going_away_sets_the_delay() -> None:
    import random

    v = _viewer(buy=False)
    _join(v)
    assert v.received(_wire({"t": "ping"}), 2.0) == [(0.0, {"t": "pong"})]
    v.received(_wire({"t": "going_away", "reason": "draining", "reconnect_after_ms": 1500}),
               2.1)
    assert v.reconnect_delay("", random.Random(1)) == 1.5


def test_decode_accepts_integer_keys_json_text_and_batches() -> None:
    raw = msgpack.packb({"t": "volatile", "event": "stock", "data": {"products": {7: 3}}})
    assert decode_server(raw)[0]["data"]["products"] == {7: 3}
    assert decode_server('[{"t":"ping"},{"t":"pong"}]') == [{"t": "ping"}, {"t": "pong"}]
    v = _viewer()
    assert v.received(b"\xc1", 1.0) == [] and v.errors == {"undecodable_frame": 1}


def test_a_broadcast_is_decoded_once_for_every_viewer_of_the_process(monkeypatch) -> None:
    calls = []
    real = viewer_mod.decode_server
    monkeypatch.setattr(viewer_mod, "decode_server", lambda d: calls.append(d) or real(d))
    viewers = [Viewer(i, f"lt-{i}", ViewerConfig(drop_id=42, buy_probability=0.0), draw=0.5)
               for i in range(3)]
    for v in viewers:
        _join(v)
    calls.clear()
    batch = _wire([event_frame("chat.message", {"user_id": f"u{k}", "text": "hi " * 10},
                               "e1", k) for k in (4, 5, 6)])
    assert len(batch) >= viewer_mod.SHARED_MIN_BYTES
    for v in viewers:
        v.received(bytes(batch), 2.0)  # a fresh bytes object per socket, as read
    assert len(calls) == 1
    assert [(v.offset, v.chat_seen, v.gaps) for v in viewers] == [(6, 3, 0)] * 3
    # A short frame (a reply, a ping) is one viewer's own: decoded each time.
    ping = _wire({"t": "ping"})
    assert len(ping) < viewer_mod.SHARED_MIN_BYTES
    viewers[0].received(ping, 2.1)
    viewers[1].received(ping, 2.1)
    assert len(calls) == 3
    # Bounded: the oldest broadcast is forgotten first.
    for k in range(viewer_mod.SHARED_FRAMES + 5):
        decode_shared(_wire({"t": "event", "event": "stock", "data": {"n": k, "pad": "x" * 64}}))
    assert len(viewer_mod._shared) == viewer_mod.SHARED_FRAMES
    assert bytes(batch) not in viewer_mod._shared
    assert decode_shared(bytearray(batch)) == decode_server(batch)


def test_chat_left_out_before_a_skipped_frame_is_not_a_lost_event() -> None:
    v = _viewer(buy=False)
    _join(v)  # position 3
    batch = [event_frame("chat.message", {}, "e1", 5),
             event_frame("chat.message", {}, "e1", 8),
             {"t": "skipped", "count": 5, "pos": {"epoch": "e1", "offset": 10}},
             event_frame("drop.buy_now", {}, "e1", 11)]
    v.received(encode(batch, Format.MSGPACK), 2.0)
    assert (v.gaps, v.chat_skipped, v.offset, v.chat_seen) == (0, 5, 11, 2)
    # A gap beyond the skipped frame's position is a lost event.
    v.received(encode([{"t": "skipped", "count": 1, "pos": {"epoch": "e1", "offset": 12}},
                       event_frame("drop.state", {}, "e1", 15)], Format.MSGPACK), 2.1)
    assert (v.gaps, v.chat_skipped, v.offset) == (2, 6, 15)
    # Without a skipped frame in the same message, missing chat is lost too.
    v.received(_wire(event_frame("chat.message", {}, "e1", 17)), 2.2)
    assert v.gaps == 3


def test_sampled_viewers_time_rehearsal_chat() -> None:
    from loadtest.viewer import chat_text

    cfg = ViewerConfig(drop_id=42, buy_probability=0.0, chat_sample=7)
    timed, untimed = Viewer(7, "lt-7", cfg, 0.5), Viewer(8, "lt-8", cfg, 0.5)
    for v in (timed, untimed):
        _join(v)
        v.received(_wire(event_frame("chat.message", {"text": chat_text(10.0, "s1")},
                                     "e1", 4)), 10.25)
        v.received(_wire(event_frame("chat.message", {"text": "typed by a person"},
                                     "e1", 5)), 10.5)
    assert timed.chat_lat == [0.25] and timed.chat_seen == 2
    assert untimed.chat_lat is None and untimed.chat_seen == 2


def test_reconnect_delay_is_jittered_from_the_first_attempt() -> None:
    import random

    rng = random.Random(3)
    v = _viewer(buy=False)
    first = {round(v.reconnect_delay("", rng), 3) for _ in range(50)}
    assert len(first) > 40 and min(first) >= 0.5 and max(first) <= 1.0
    v.reconnects = 10
    later = [v.reconnect_delay("", rng) for _ in range(200)]
    assert min(later) >= 0.5 and max(later) <= 5.0 and max(later) > 3.0


def test_an_outage_is_timed_from_the_lost_socket_to_the_rejoin() -> None:
    v = _viewer(buy=False)
    _join(v, offset=10)
    v.closed(None, "reset", 3.0)  # a crash: no going_away
    assert v.down == (3.0, False)
    v.closed(502, "bad gateway", 3.5)  # a failed attempt to come back changes nothing
    assert v.down == (3.0, False)
    [join] = v.opened(4.0)
    v.received(_wire({"t": "joined", "id": str(join["id"]), "recovered": True,
                      "pos": {"epoch": "e1", "offset": 10}, "events": []}), 4.25)
    assert v.down is None and v.outages == [(3.0, 4.25, True, False)]
    # A drain announces itself with going_away.
    v.received(_wire({"t": "going_away", "reason": "restart", "reconnect_after_ms": 900}),
               5.0)
    v.closed(1012, "service restart", 5.01)
    assert v.down == (5.01, True)


def test_an_unanswered_buy_is_sent_again_with_its_key_after_the_rejoin() -> None:
    v = _viewer()
    _join(v)
    [(_, buy)] = v.received(_wire(event_frame("drop.buy_now", {"product_id": 9}, "e1", 4)),
                            5.0)
    v.closed(None, "reset", 5.05)  # the node died with the buy in flight
    assert v.buy_outcome is BuyOutcome.NO_REPLY
    [join] = v.opened(6.0)
    out = v.received(_wire({"t": "joined", "id": str(join["id"]), "recovered": True,
                            "pos": {"epoch": "e1", "offset": 4}, "events": []}), 6.1)
    [(delay, again)] = out
    assert delay == 0 and again["t"] == "buy" and again["id"] != buy["id"]
    assert (again["idempotency_key"], again["product_id"]) == (buy["idempotency_key"], 9)
    assert v.buy_outcome is None and v.buy_retries == 1
    v.received(_wire({"t": "reply", "id": str(again["id"]),
                      "data": {"hold_id": "h1", "buyer_number": 3, "replay": True}}), 6.2)
    assert (v.buy_outcome, v.hold_id, v.buyer_number) == (BuyOutcome.HELD, "h1", 3)
    assert round(v.buy_reply_at - v.buy_sent_at, 3) == 1.2  # from the first send


def test_buy_now_recovered_after_a_reconnect_is_late_not_live() -> None:
    v = _viewer(buy=False)
    _join(v, offset=3)
    v.closed(None, "reset", 4.0)
    [join] = v.opened(5.0)
    events = [event_frame("drop.state", {"state": "selling"}, "e1", 4),
              event_frame("drop.buy_now", {"product_id": 9}, "e1", 5)]
    v.received(_wire({"t": "joined", "id": str(join["id"]), "recovered": True,
                      "pos": {"epoch": "e1", "offset": 5}, "events": events}), 5.1)
    assert v.buy_now_at == 5.1 and v.buy_now_late and v.gaps == 0


def _chat_batch(epoch: str, offsets: list[int], skipped_to: int | None, sent: float) -> bytes:
    from loadtest.viewer import chat_text

    frames = [event_frame("chat.message", {"text": chat_text(sent, f"s{o}"), "at": 1_000_000,
                                           "pad": "x" * 20}, epoch, o) for o in offsets]
    if skipped_to is not None:
        frames.append({"t": "skipped", "count": 3, "pos": {"epoch": epoch, "offset": skipped_to}})
    return _wire(frames)


def _state(v: Viewer) -> dict:
    return {name: getattr(v, name) for name in Viewer.__slots__ if name != "config"}


def test_a_chat_batch_is_checked_once_per_starting_position_with_each_viewers_result(
        monkeypatch) -> None:
    """Viewers at the same position share one full reading of a chat batch; a viewer
    elsewhere (behind after a lost batch) gets its own, with its own gap."""
    made = []
    real = viewer_mod._scratch
    monkeypatch.setattr(viewer_mod, "_scratch", lambda: made.append(1) or real())
    viewers = [Viewer(i, f"lt-{i}", ViewerConfig(drop_id=42, buy_probability=0.0), 0.5)
               for i in range(50)]
    for v in viewers:
        _join(v, offset=3)
    behind = viewers[-1]
    behind.received(_wire(event_frame("chat.message", {}, "e1", 2)), 1.5)  # a repeat
    made.clear()
    first = _chat_batch("e1", [5, 7], 10, 2.0)
    for v in viewers[:-1]:
        v.received(bytes(first), 2.0)
    assert len(made) == 1
    assert {(v.offset, v.chat_seen, v.chat_skipped, v.gaps, v.durable) for v in viewers[:-1]} \
        == {(10, 2, 5, 0, 2)}
    assert all(v.last_event_at == 2.0 for v in viewers[:-1])
    second = _chat_batch("e1", [12], 14, 3.0)  # 11 missing, before the skipped frame
    for v in viewers:
        v.received(bytes(second), 3.0)
    assert len(made) == 3  # from 10, and the viewer still at 3
    assert {(v.offset, v.chat_seen, v.chat_skipped, v.gaps) for v in viewers[:-1]} \
        == {(14, 3, 8, 0)}
    # Behind: 4..11 and 13..14 missing, all up to the skipped frame's 14: chat left out.
    assert (behind.offset, behind.chat_seen, behind.chat_skipped, behind.gaps,
            behind.out_of_order) == (14, 2, 10, 0, 1)
    third = _chat_batch("e1", [20], None, 4.0)  # no skipped frame: 15..19 are lost
    for v in viewers:
        v.received(bytes(third), 4.0)
    assert {(v.offset, v.gaps) for v in viewers} == {(20, 5)}


def test_shared_reading_gives_every_viewer_what_reading_in_full_gives(monkeypatch) -> None:
    """Random streams of chat batches (gaps, repeats, reordering, a new epoch, skipped
    frames), BUY NOW, sold out, the end and a giveaway (alone or with chat in front),
    and pings between them: a viewer reading through shared frames ends in the same
    state, and answers the same, as one reading every message itself; buyers, entrants
    and viewers timing chat too."""
    import random
    import time as time_mod

    monkeypatch.setattr(time_mod, "time", lambda: 5_000.0)
    rng = random.Random(16)
    drop_events = [("drop.buy_now", {"product_id": 1, "variants": [
                        {"variant_id": 5, "remaining": 2}, {"variant_id": 6, "remaining": 1}]}),
                   ("drop.sold_out", {}), ("drop.ended", {}),
                   ("giveaway.opened", {"giveaway_id": 3}),
                   ("giveaway.drawn", {"giveaway_id": 3, "seed": "s",
                                       "winners": [{"ticket": 4}]})]
    for trial in range(40):
        viewer_mod._shared.clear()
        cfg = ViewerConfig(drop_id=42, buy_probability=0.6, buy_delay_ms=(0, 100),
                           chat_sample=3 if trial % 2 else 0, enter_probability=0.5)
        draws = [0.1, 0.5, 0.9, 0.3]
        shared = [Viewer(i, f"lt-{i}", cfg, draws[i]) for i in range(4)]
        full = [Viewer(i, f"lt-{i}", cfg, draws[i]) for i in range(4)]
        for v in shared + full:
            _join(v, offset=3)
        epoch, offset = "e1", 3
        for step in range(40):
            now = 10.0 + step
            roll = rng.random()
            if roll < 0.05:
                epoch, offset = f"e{step}", rng.randrange(0, 50)
            frames: list = []
            if roll < 0.1:
                data = _wire({"t": "ping"})
            else:
                if roll < 0.8:
                    n = rng.randrange(1, 6)
                    offsets = sorted(rng.sample(range(offset + 1, offset + 12), n))
                    if rng.random() < 0.1:
                        offsets.reverse()
                    if rng.random() < 0.1:
                        offsets.append(offsets[0])
                    sent = now - rng.uniform(0.1, 1.5)
                    frames = msgpack.unpackb(_chat_batch(epoch, offsets, None, sent))
                    offset = max(offsets)
                    if rng.random() < 0.7:
                        offset += rng.randrange(0, 3)
                        frames.append({"t": "skipped", "count": 2,
                                       "pos": {"epoch": epoch, "offset": offset}})
                if roll >= 0.6:  # one creator action: one or two events
                    for name, payload in rng.sample(drop_events, rng.choice((1, 2))):
                        offset += rng.choice((1, 1, 2))
                        frames.append(event_frame(name, payload, epoch, offset))
                data = _wire(frames if len(frames) > 1 else frames[0])
            for i in range(4):
                if rng.random() < 0.1:
                    continue  # this viewer missed the frame (its own gap follows)
                got = shared[i].received(bytes(data), now)
                assert got == full[i].read_messages(decode_server(data), now), trial
        for a, b in zip(shared, full, strict=True):
            assert _state(a) == _state(b), trial


def test_buy_now_with_chat_in_front_checks_positions_once_and_times_each_viewer(
        monkeypatch) -> None:
    """BUY NOW riding behind the chat in front of it: the positions are checked once
    for the viewers at the same position, and each viewer still notes BUY NOW at the
    moment it read the frame and sends its own buy."""
    made = []
    real = viewer_mod._scratch
    monkeypatch.setattr(viewer_mod, "_scratch", lambda: made.append(1) or real())
    cfg = ViewerConfig(drop_id=42, buy_probability=1.0, buy_delay_ms=(0, 0))
    viewers = [Viewer(i, f"lt-{i}", cfg, 0.5) for i in range(20)]
    for v in viewers:
        _join(v, offset=3)
    made.clear()
    frames = msgpack.unpackb(_chat_batch("e1", [5], 6, 1.0))
    frames += [event_frame("drop.state", {"state": "selling"}, "e1", 7),
               event_frame("drop.buy_now", {"product_id": 9}, "e1", 8)]
    data = _wire(frames)
    outs = [v.received(bytes(data), 2.0 + i / 100) for i, v in enumerate(viewers)]
    assert len(made) == 1
    assert [v.buy_now_at for v in viewers] == [2.0 + i / 100 for i in range(20)]
    assert [[(d, m["t"], m["product_id"], m["idempotency_key"]) for d, m in out]
            for out in outs] == [[(0.0, "buy", 9, f"lt-lt-{i}-1")] for i in range(20)]
    assert {(v.offset, v.durable, v.chat_seen, v.chat_skipped, v.gaps) for v in viewers} \
        == {(8, 3, 1, 2, 0)}


def test_the_frame_just_read_is_found_again_without_confusing_two_of_one_length() -> None:
    from loadtest.viewer import shared_frame

    a = _chat_batch("e1", [5, 6], 7, 1.0)
    b = bytes(a).replace(b"e1", b"e2")  # as long as a, other bytes
    assert len(a) == len(b) and a != b
    seen = [shared_frame(bytes(x)) for x in (a, a, b, b, a, b)]
    assert [f.items[0]["pos"]["epoch"] for f in seen] == ["e1", "e1", "e2", "e2", "e1", "e2"]
    assert seen[0] is seen[1] is seen[4] and seen[2] is seen[3] is seen[5]
