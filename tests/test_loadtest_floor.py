"""The rehearsal's floors (loadtest/floor.py, loadtest/floor_viewer.py): the rush
floor sells exactly its stock and answers every buyer, its viewers buy as the drop's
do, the report carries both floors' ratios, and ``--floor`` is checked; the chat floor
delivers every message to every viewer, batched or not, times it as the rehearsal
times chat, and is reported beside the rehearsal's chat with a ratio."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from websockets.asyncio.client import connect as ws_connect

from loadtest.floor import chat_control, floor_message, rush_keys, serve_broadcast
from loadtest.floor_viewer import FloorViewer, summarize_floor
from loadtest.rehearse import Rehearsal, RehearsalConfig
from loadtest.rehearse_cli import add_arguments
from loadtest.report import format_console
from loadtest.verdict import compare_floor
from loadtest.viewer import Viewer, ViewerConfig, chat_text
from tests.conftest import free_port


@contextlib.asynccontextmanager
async def rush_server(redis_url: str, channel: str, chat_batch_ms: int | None = None):
    port = free_port()
    task = asyncio.ensure_future(serve_broadcast(port, redis_url, channel,
                                                 rush=chat_batch_ms is None,
                                                 chat_batch_ms=chat_batch_ms))
    try:
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError):
                async with ws_connect(f"ws://127.0.0.1:{port}/"):
                    break
            await asyncio.sleep(0.05)
        yield f"ws://127.0.0.1:{port}/"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_rush_floor_sells_exactly_its_stock_and_answers_every_buyer(r, clean_backends):
    channel = "t:rush"
    stock_key, buyers_key = rush_keys(channel, 1)
    await r.set(stock_key, 7)
    async with rush_server(clean_backends.redis_url, channel) as url:
        socks = [await ws_connect(url) for _ in range(20)]

        async def buy(ws, i: int, key: str):
            await ws.send(msgpack.packb({"t": "buy", "id": i, "quantity": 1,
                                         "idempotency_key": key, "product_id": 1}))
            return msgpack.unpackb(await ws.recv())
        replies = await asyncio.gather(*(buy(ws, i, f"lt-{i}-1") for i, ws in enumerate(socks)))
        assert all(f["id"] == str(i) for i, f in enumerate(replies))  # each to its buyer
        held = [f for f in replies if f["t"] == "reply"]
        assert len(held) == 7
        assert sorted(f["data"]["buyer_number"] for f in held) == list(range(1, 8))
        assert Counter(f.get("code") for f in replies if f["t"] == "error") == {"sold_out": 13}
        # A retry with the same key gets its first answer back, not a second unit.
        first = held[0]
        again = await buy(socks[int(first["id"])], 99, f"lt-{first['id']}-1")
        assert again["data"]["buyer_number"] == first["data"]["buyer_number"]
        # A JSON buyer is answered in text; nothing is taken once the stock is gone.
        await socks[0].send(json.dumps({"t": "buy", "id": 5, "idempotency_key": "late",
                                        "product_id": 1}))
        late = json.loads(await socks[0].recv())
        assert late == {"t": "error", "id": "5", "code": "sold_out"}
        for ws in socks:
            await ws.close()
    assert int(await r.get(stock_key)) == 0 and await r.hlen(buyers_key) == 7


def test_floor_viewer_buys_once_per_message_as_the_drop_viewer_does() -> None:
    """The same draw gives the same decision and reaction time as a drop viewer; one
    buy per message, its product, and the reply read; the bare floor's never buy."""
    draw = 0.3
    drop = Viewer(0, "lt-0", ViewerConfig(drop_id=1, buy_probability=0.5,
                                          buy_delay_ms=(0, 200)), draw)
    v = FloorViewer(0, "lt-0", draw, 0.5, (0, 200))
    [(delay, frame)] = v.received(floor_message(0), 10.0)
    assert delay == pytest.approx(drop._buy_delay) and delay == pytest.approx(0.12)
    assert frame == {"t": "buy", "id": 1, "quantity": 1, "idempotency_key": "lt-lt-0-1",
                     "product_id": 1}
    assert v.received(floor_message(0), 10.1) == []  # the same message again: no buy
    v.sent_delayed(10.12, frame)
    v.received(msgpack.packb({"t": "reply", "id": "1", "data": {"buyer_number": 1}}), 10.2)
    [(_, second)] = v.received(floor_message(1), 12.0)
    assert second["product_id"] == 2 and second["idempotency_key"] == "lt-lt-0-2"
    v.received(msgpack.packb({"t": "error", "id": "2", "code": "sold_out"}), 12.3)
    counts: Counter[str] = Counter()
    v.count_into(counts)
    assert counts["buys_sent"] == 2 and counts["buy_held"] == 1
    assert counts["buy_sold_out"] == 1 and counts["floor_seen"] == 3  # 0, 0 again, 1
    summary = summarize_floor([v])
    assert summary["floor_buys"] == {"sent": 2, "held": 1, "sold_out": 1}
    assert summary["floor_buy_latency"] == [pytest.approx(0.08), pytest.approx(0.3)]
    bare = FloorViewer(1, "lt-1", draw, 0.0, (0, 200))
    assert bare.received(floor_message(0), 10.0) == []
    assert summarize_floor([bare])["floor_buys"] == {}


class _Target:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url


@pytest.mark.timeout(90)
async def test_rush_floor_measured_by_the_rehearsal_sells_its_stock_each_time(
        clean_backends, tmp_path: Path) -> None:
    """200 viewers, 60% buying, 15 units a message: every message sells exactly 15,
    every buy is answered."""
    cfg = RehearsalConfig(viewers=200, stock=15, server_workers=2, swarm_processes=2,
                          connect_rate=1000, buy_probability=0.6, buy_delay_ms=(0, 50),
                          floor="rush", floor_events=3, floor_interval_s=0.3,
                          rush_timeout_s=15, out_dir=str(tmp_path), quiet=True)
    floor = await Rehearsal(cfg).measure_floor(_Target(clean_backends.redis_url), 200,
                                               rush=True)
    assert floor["measured"] and floor["delivered"] == floor["expected"] == 600
    rush = floor["rush"]
    per_message = rush["sold"]
    assert [e["sold"] for e in per_message] == [15, 15, 15]
    assert [e["buyers"] for e in per_message] == [15, 15, 15]
    assert all(e["buys"] > 15 for e in per_message)  # more buyers than stock: a rush
    assert rush["units_sold"] == 45 and rush["oversold"] == 0
    buys = rush["buys"]
    assert buys["held"] == 45
    assert buys["held"] + buys["sold_out"] == buys["sent"] == sum(e["buys"] for e in per_message)
    assert "no_reply" not in buys and "rejected" not in buys
    assert rush["buy_latency"]["count"] == buys["sent"]
    assert floor["server_cpu_s"] > 0 and floor["server_window_s"] > 0.9  # 3 x 0.3 s apart


def _result(bare_p99: float, rush_p99: float) -> dict:
    lat = {"p50_ms": 100.0, "p99_ms": 600.0, "max_ms": 700.0}
    result = {"buy_now": {"latency": lat}, "failures": [], "passed": True,
              "floor": {"measured": True, "latency": {"p50_ms": 50.0, "p99_ms": bare_p99,
                                                       "max_ms": 400.0}},
              "rush_floor": {"measured": True, "latency": {"p50_ms": 80.0,
                                                            "p99_ms": rush_p99,
                                                            "max_ms": 600.0},
                             "rush": {"stock_per_event": 500, "units_sold": 1000,
                                      "oversold": 0, "sold": [{"sold": 500}] * 2,
                                      "buys": {"sent": 30, "held": 20, "sold_out": 10},
                                      "buy_latency": {"p50_ms": 9.0, "p99_ms": 20.0}}}}
    compare_floor(result)
    return result


def _rows(console: str) -> dict[str, str]:
    """The console summary's rows, label -> value (two spaces or more between)."""
    pairs = (re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in console.splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def test_the_report_carries_both_floors_and_both_ratios() -> None:
    result = _result(bare_p99=300.0, rush_p99=480.0)
    assert result["buy_now"]["floor_ratio"]["p99"] == 2.0
    assert result["buy_now"]["rush_floor_ratio"]["p99"] == 1.25
    assert result["passed"] is True
    rows = _rows(format_console(result))
    assert rows["bare floor: broadcast only, p50 / p99 / max"].startswith(
        "50.0 / 300.0 / 400.0 ms")
    assert rows["BUY NOW / bare floor, p50 / p99 (issue 16's goal)"] == "2.0 / 2.0"
    assert rows["rush floor: broadcast + the same buy rush, p50 / p99 / max"].startswith(
        "80.0 / 480.0 / 600.0 ms")
    assert rows["BUY NOW / rush floor, p50 / p99"] == "1.2 / 1.2"  # 1.25 shown as 1.2
    assert rows["rush floor: units sold per message / stock"] == "500, 500 / 500 (oversold 0)"
    assert rows["rush floor: buys sent / held / sold out / no reply"].startswith(
        "30 / 20 / 10 / 0;")
    bad = _result(300.0, 480.0)
    bad["rush_floor"]["rush"]["oversold"] = 3
    bad["failures"], bad["passed"] = [], True
    compare_floor(bad)
    assert bad["passed"] is False and "the rush floor sold 3 units over its stock" in \
        bad["failures"]


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rehearse", exit_on_error=False)
    add_arguments(p)
    return p.parse_args(list(argv))


def test_the_floor_option_is_parsed_and_a_wrong_one_refused(capsys) -> None:
    assert _parse().floor == "bare"  # the floor, as before
    assert _parse("--floor", "both").floor == "both"
    assert _parse("--no-floor").floor == "none"
    assert RehearsalConfig(floor="both").floors() == ["bare", "rush"]
    assert RehearsalConfig(floor="rush").floors() == ["rush"]
    assert RehearsalConfig(floor=False).floors() == []  # the old boolean still reads
    assert RehearsalConfig(floor=True).floors() == ["bare"]
    with pytest.raises(ValueError, match="floor must be one of bare, rush, both, none"):
        RehearsalConfig(floor="rushed")
    from loadtest.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["rehearse", "--floor", "rushed"])
    assert exc.value.code == 2
    assert "argument --floor: invalid choice: 'rushed'" in capsys.readouterr().err


def test_the_servers_rush_cpu_is_reported_in_seconds_beside_the_floors() -> None:
    """BUY NOW through the rush took the server 3.5 CPU-seconds in 2 s: 175 %, 3.5 s
    (the rush floors report their servers' seconds the same way: server_cpu_s)."""
    from loadtest.procstat import ProcSample
    from loadtest.viewer_summary import summarize_viewers

    report = summarize_viewers([])
    report.update({"joined_at": [100.5], "ramp_started_at": 100.0, "connect_errors": {},
                   "close_reasons": {}, "totals": {"joined": 1}})
    before, after = ProcSample(10.0, 100 << 20, 50.0), ProcSample(12.0, 100 << 20, 53.5)

    class _Watch:
        pids = [1]  # what compose reads of the watch
    rehearsal = Rehearsal(RehearsalConfig(viewers=1, stock=1, server_workers=1))
    rehearsal.watch = _Watch()
    result = rehearsal.compose([report], {"checked": False}, t_buy_now=0.0, joined=1,
                               connect_s=1.0, baseline=before, after_connect=before,
                               cpu_window=(before, after))
    assert result["server"]["cpu_rush_percent"] == 175.0
    assert result["server"]["cpu_rush_s"] == 3.5


async def _frames(ws, until: float) -> list:
    """Every frame a socket gets until ``until`` (loop time), decoded."""
    out = []
    loop = asyncio.get_running_loop()
    while (left := until - loop.time()) > 0:
        try:
            async with asyncio.timeout(left):
                data = await ws.recv()
                out.append(json.loads(data) if isinstance(data, str) else msgpack.unpackb(data))
        except TimeoutError:
            break
    return out


async def test_chat_floor_relays_every_message_to_every_socket_in_one_batch_per_interval(
        r, clean_backends) -> None:
    """Two server processes' worth (two servers on one channel), three sockets each:
    three messages sent from two sockets reach all six sockets, in one batch per
    socket when they came within one interval; the sender gets its reply; a refused
    message is answered and reaches nobody; unbatched, each message is its own frame."""
    channel = "t:chat"
    async with rush_server(clean_backends.redis_url, channel, 300) as a, \
            rush_server(clean_backends.redis_url, channel, 300) as b:
        socks = [await ws_connect(u) for u in (a, a, a, b, b, b)]
        loop = asyncio.get_running_loop()
        await socks[0].send(msgpack.packb({"t": "chat.send", "id": "c1", "text": "one"}))
        await socks[0].send(msgpack.packb({"t": "chat.send", "id": "c2", "text": "two"}))
        await socks[4].send(json.dumps({"t": "chat.send", "id": "c3", "text": "three"}))
        await socks[1].send(msgpack.packb({"t": "chat.send", "id": "c4", "text": " "}))
        got = await asyncio.gather(*(_frames(ws, loop.time() + 2.0) for ws in socks))
        for i, frames in enumerate(got):
            replies = [f for f in frames if isinstance(f, dict)]
            batches = [f for f in frames if isinstance(f, list)]
            texts = sorted(m["data"]["text"] for batch in batches for m in batch)
            assert texts == ["one", "three", "two"], i  # every message, once
            assert all(m["event"] == "chat.message" and m["data"]["batch_ms"] == 300
                       and m["data"]["at"] > 0 for batch in batches for m in batch)
            assert len(batches) <= 2  # batched (3 messages sent within one interval,
            # at most split over two by the interval's edge)
            want = {0: ["c1", "c2"], 1: ["c4"], 4: ["c3"]}.get(i, [])
            assert sorted(f["id"] for f in replies) == want, i
        assert [f["code"] for f in got[1] if isinstance(f, dict)] == ["bad_request"]
        # Unbatched from now on (the rehearsal's switch): one frame per message.
        await r.publish(channel, chat_control(0))
        await asyncio.sleep(0.2)
        await socks[3].send(msgpack.packb({"t": "chat.send", "id": "c5", "text": "four"}))
        await socks[3].send(msgpack.packb({"t": "chat.send", "id": "c6", "text": "five"}))
        got = await asyncio.gather(*(_frames(ws, loop.time() + 1.5) for ws in socks))
        for frames in got:
            events = [f for f in frames if isinstance(f, dict) and f["t"] == "event"]
            assert [f["data"]["text"] for f in events] == ["four", "five"]
            assert {f["data"]["batch_ms"] for f in events} == {0}
            assert not any(isinstance(f, list) for f in frames)
        for ws in socks:
            await ws.close()


async def test_chat_floor_takes_a_burst_bigger_than_a_redis_pool(clean_backends) -> None:
    """150 sockets post at once (after a batch, a process reads all the chat that came
    meanwhile): every post is published and reaches every socket; each publish does not
    take a connection of its own (redis-py's default pool: 100; the 10,000-viewer
    chat floor lost sockets to MaxConnectionsError before the publisher's pool waited)."""
    async with rush_server(clean_backends.redis_url, "t:burst", 200) as url:
        socks = [await ws_connect(url) for _ in range(150)]
        await asyncio.gather(*(ws.send(msgpack.packb({"t": "chat.send", "id": f"c{i}",
                                                      "text": f"m{i}"}))
                               for i, ws in enumerate(socks)))
        loop = asyncio.get_running_loop()
        got = await asyncio.gather(*(_frames(ws, loop.time() + 3.0) for ws in socks))
        for i, frames in enumerate(got):
            texts = {m["data"]["text"] for f in frames if isinstance(f, list) for m in f}
            assert texts == {f"m{k}" for k in range(150)}, i
            assert [f["id"] for f in frames if isinstance(f, dict)] == [f"c{i}"]
        for ws in socks:
            await ws.close()


async def test_a_swarm_answers_a_chat_stop_with_all_it_sent(clean_backends, capsys) -> None:
    """The chat floor counts on it: a swarm's answer to ``chat_rate`` 0 says how many
    messages it sent, and none leaves after (a loaded 50,000-viewer swarm read its
    stop late and kept sending: the rehearsal, reading its progress instead, counted
    fewer than were sent and collected before the last batch had reached everyone)."""
    from loadtest.swarm import Swarm, SwarmConfig, _control

    async with rush_server(clean_backends.redis_url, "t:ack", 100) as url:
        swarm = Swarm(SwarmConfig(ws_url=url, drop_id=0, first=0, count=20, rate=1000,
                                  mode="floor_chat", chat_sample=1))
        await swarm.ramp()
        reader, done = asyncio.StreamReader(), asyncio.Event()
        control = asyncio.ensure_future(_control(swarm, reader, done))
        reader.feed_data(b'{"cmd": "chat_rate", "rate": 100, "label": "100"}\n')
        await asyncio.sleep(0.6)
        reader.feed_data(b'{"cmd": "chat_rate", "rate": 0}\n')
        acks: list = []
        for _ in range(200):  # until the swarm has read the stop
            acks += [json.loads(line) for line in capsys.readouterr().out.splitlines()
                     if line.startswith("{")]  # the server prints "ready"
            if len(acks) == 2:
                break
            await asyncio.sleep(0.05)
        assert [a["type"] for a in acks] == ["chat_rate", "chat_rate"]
        sent = acks[-1]["sent"]
        assert sent >= 30 and sent == swarm.chat_sent == swarm.chat_sent_by["100"]
        for _ in range(200):  # until every viewer has it all (or the assert says why)
            if all(v.chat_counts.get(100) == sent for v in swarm.viewers):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # 30 messages at the rate asked, had it gone on
        assert swarm.chat_sent == sent  # nothing after the answer
        assert all(v.chat_counts == {100: sent} for v in swarm.viewers)  # every one, all
        assert all(len(v.chat_lat) == sent for v in swarm.viewers)  # each timed
        done.set()
        reader.feed_eof()
        await control
        await swarm.stop()


def test_floor_viewer_counts_and_times_chat_by_interval() -> None:
    """Every chat message counted under its interval, the timed viewer's latencies
    from the send time in the text; the chat frame is a rehearsal viewer's."""
    def batch(interval: int, *sent: float) -> bytes:
        return msgpack.packb([{"t": "event", "event": "chat.message",
                               "data": {"text": chat_text(t, "0/1"), "batch_ms": interval},
                               "pos": {"epoch": "e", "offset": 1}} for t in sent])
    timed, plain = FloorViewer(0, chat_timed=True), FloorViewer(1)
    for v in (timed, plain):
        assert v.received(batch(250, 10.0, 10.1), 10.3) == []
        assert v.received(batch(250, 10.2), 10.5) == []
        assert v.received(batch(1000, 20.0, 20.5, 20.9), 21.0) == []
        v.received(msgpack.packb({"t": "reply", "id": "c1", "data": {}}), 21.1)  # ignored
    assert timed.chat_counts == plain.chat_counts == {250: 3, 1000: 3}
    assert timed.chat_lat == [(250, 0.3), (250, pytest.approx(0.2)), (250, 0.3),
                              (1000, 1.0), (1000, 0.5), (1000, pytest.approx(0.1))]
    assert plain.chat_lat is None
    drop = Viewer(0, "lt-0", ViewerConfig(drop_id=1), 0.5)
    assert timed.chat_message("x")["t"] == drop.chat_message("x")["t"] == "chat.send"
    counts: Counter[str] = Counter()
    timed.count_into(counts)
    assert counts["chat_seen"] == 6
    summary = summarize_floor([timed, plain])
    assert summary["chat_floor_counts"] == {"250": {3: 2}, "1000": {3: 2}}
    assert sorted(summary["chat_floor_latency"]["1000"]) == [pytest.approx(0.1), 0.5, 1.0]


@pytest.mark.timeout(120)
async def test_chat_floor_measured_by_the_rehearsal_delivers_every_message(
        clean_backends, tmp_path: Path) -> None:
    """200 viewers, 2 server processes, 40 chat messages/s: unbatched, then one batch
    per 250 ms, on the same sockets: each storm reaches every viewer whole (sent x
    viewers, every viewer every message), timed on every viewer (200 / 500 -> 1)."""
    cfg = RehearsalConfig(viewers=200, server_workers=2, swarm_processes=2,
                          connect_rate=1000, chat_rate=40, chat_floor_intervals=(0, 250),
                          chat_floor_s=1.5, out_dir=str(tmp_path), quiet=True)
    rehearsal = Rehearsal(cfg)
    floor = await rehearsal.measure_chat_floor(_Target(clean_backends.redis_url), 200)
    assert floor["measured"] and floor["viewers"] == 200 and floor["processes"] == 2
    assert [i["batch_ms"] for i in floor["intervals"]] == [0, 250]
    for i in floor["intervals"]:
        assert i["sent"] >= 40 and i["sent_per_s"] > 20  # ~40/s for 1.5 s, both swarms
        assert i["drained"] and i["delivered"] == i["expected"] == i["sent"] * 200
        assert i["per_viewer"] == {"min": i["sent"], "max": i["sent"],
                                   "viewers_with_all": 200}
        lat = i["latency"]
        assert lat["count"] == i["sent"] * 200  # every viewer timed at this size
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert i["server_cpu_s"] > 0 and i["storm_s"] >= 1.5
    # Batched, a message waits for its batch: ~60 messages over six 250 ms batches,
    # some came just after one left.
    assert floor["intervals"][1]["latency"]["max_ms"] >= 100
    assert rehearsal.generator["chat_floor_250"]["window_s"] >= 1.5


def _chat_result(floor_p99s: dict[int, float], delivered_short: int = 0) -> dict:
    intervals = [{"batch_ms": ms, "sent": 10, "sent_per_s": 5.0, "expected": 100,
                  "delivered": 100 - (delivered_short if ms == 250 else 0),
                  "per_viewer": {"min": 9, "max": 10, "viewers_with_all": 9},
                  "latency": {"p50_ms": p99 / 2, "p99_ms": p99, "max_ms": p99 + 10}}
                 for ms, p99 in floor_p99s.items()]
    result = {"buy_now": {"latency": {"p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0}},
              "failures": [], "passed": True,
              "chat": {"sent": 500, "latency": {"p50_ms": 400.0, "p99_ms": 2000.0},
                       "phases": {"before": {"latency": {"p99_ms": 800.0}}}},
              "chat_floor": {"measured": True, "intervals": intervals}}
    compare_floor(result)
    return result


def test_the_report_puts_chat_beside_the_best_whole_chat_floor() -> None:
    result = _chat_result({250: 300.0, 500: 400.0, 1000: 800.0})
    assert result["chat_floor"]["best"]["batch_ms"] == 250
    assert result["chat"]["chat_floor_ratio"] == {"p50": 2.67, "p99": 6.67,
                                                "before_p99": 2.67}
    rows = _rows(format_console(result))
    assert rows["chat floor, batch 500 ms: p50 / p99 / max"].startswith(
        "200.0 / 400.0 / 410.0 ms (100 / 100 delivered")
    assert rows["chat / chat floor (best: 250 ms), p50 / p99 / before BUY NOW p99"] == \
        "2.7 / 6.7 / 2.7"
    # An interval that lost messages is no floor: the best whole one is taken instead.
    short = _chat_result({250: 300.0, 500: 400.0}, delivered_short=1)
    assert short["chat_floor"]["best"] == {"batch_ms": 500, "complete": True,
                                           "latency": short["chat_floor"]["intervals"][1][
                                               "latency"]}
    assert short["passed"] is True
    # More delivered than sent x viewers: the floor's own figures are wrong.
    dup = _chat_result({250: 300.0}, delivered_short=-5)
    assert dup["passed"] is False
    assert dup["failures"] == ["the chat floor (250 ms) delivered 105 messages of 100 sent "
                               "x viewers"]


def test_the_chat_floor_options_are_parsed_and_checked(capsys) -> None:
    assert _parse().chat_floor_intervals == ()  # none by default: runs as before
    ns = _parse("--chat-floor-intervals", "250,500,1000", "--chat-floor-duration", "20")
    assert ns.chat_floor_intervals == (250, 500, 1000) and ns.chat_floor_s == 20.0
    assert _parse("--chat-floor-intervals", "0").chat_floor_intervals == (0,)
    with pytest.raises(ValueError, match="needs a chat rate"):
        RehearsalConfig(chat_floor_intervals=(250,))
    with pytest.raises(ValueError, match="0 \\(unbatched\\) or more"):
        RehearsalConfig(chat_rate=5, chat_floor_intervals=(-1,))
    with pytest.raises(ValueError, match="each chat floor interval once"):
        RehearsalConfig(chat_rate=5, chat_floor_intervals=(250, 500, 250))
    from loadtest.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["rehearse", "--chat-floor-intervals", "250,x"])
    assert exc.value.code == 2
    assert "not a list of ms" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs a chat rate"):
        main(["rehearse", "--chat-floor-intervals", "250"])
