"""The rehearsal's floors (loadtest/floor.py, loadtest/floor_viewer.py): the rush
floor sells exactly its stock and answers every buyer, its viewers buy as the drop's
do, the report carries both floors' ratios, and ``--floor`` is checked."""

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

from loadtest.floor import floor_message, rush_keys, serve_broadcast
from loadtest.floor_viewer import FloorViewer, summarize_floor
from loadtest.rehearse import Rehearsal, RehearsalConfig
from loadtest.rehearse_cli import add_arguments
from loadtest.report import format_console
from loadtest.verdict import compare_floor
from loadtest.viewer import Viewer, ViewerConfig
from tests.conftest import free_port


@contextlib.asynccontextmanager
async def rush_server(redis_url: str, channel: str):
    port = free_port()
    task = asyncio.ensure_future(serve_broadcast(port, redis_url, channel, rush=True))
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
