"""A whole rehearsal, small: local server (1 worker), 2 swarm processes, 200 viewers.

This is the same code path as the 50,000-viewer rehearsal in docs/benchmarks.md, with
real Redis, PostgreSQL and uvicorn; it checks correctness (everyone saw BUY NOW, no
event lost, exactly ``stock`` holds, no oversell), not speed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loadtest.rehearse import RehearsalConfig, rehearse


@pytest.mark.timeout(150)
def test_small_rehearsal_holds_and_never_oversells(tmp_path: Path) -> None:
    """With a chat storm, in a room the server treats as big (its chat batched and
    sampled), the creator's control-path probes and the three floors: the bare
    broadcast, the one whose viewers buy as the drop's did, and the chat floor (the
    same storm through bare servers, every message to every viewer)."""
    cfg = RehearsalConfig(
        viewers=200, stock=20, server_workers=1, swarm_processes=2, connect_rate=1000,
        buy_probability=0.6, buy_delay_ms=(0, 50), chat_messages=6, countdown_s=1.5,
        chat_rate=40, probe_interval_s=0.2, floor="both", floor_events=3, floor_interval_s=0.5,
        chat_floor_intervals=(250,), chat_floor_s=1.0,
        rush_timeout_s=15, max_duration_s=90, out_dir=str(tmp_path), quiet=True,
        p99_budget_ms=5000, command="test",
        server_env={"DROPSERVER_CHAT_BATCH_VIEWERS": "50", "DROPSERVER_CHAT_BATCH_MS": "250",
                    "DROPSERVER_CHAT_READ_RATE": "4"},
    )
    result = asyncio.run(rehearse(cfg))
    assert result["failures"] == [] and result["passed"] is True
    assert result["connections"]["joined"] == 200
    assert result["buy_now"]["seen"] == 200
    assert result["buy_now"]["latency"]["count"] == 200
    assert result["positions"]["lost"] == 0
    assert result["positions"]["out_of_order"] == 0
    # every viewer got every durable event: state changes, chat, BUY NOW, sold out, end
    assert result["positions"]["durable_events_received"] >= 200 * 5
    res = result["reservations"]
    assert res["sent"] > 20  # more buyers than stock: a real rush
    assert res["held"] == 20
    assert res["held"] + res["sold_out"] + res["rejected"] == res["sent"]
    audit = result["audit"]
    assert audit["checked"] and audit["oversold"] == 0
    assert audit["active_orders"] == 20 and audit["units"] == 20
    assert audit["duplicate_buyer_numbers"] == 0 and audit["mismatched_users"] == 0
    assert audit["redis_remaining"] == {str(result["drop"]["product_ids"][0]): 0}
    assert result["server"]["rss_per_connection_kib"] is not None
    # The chat storm: sampled (viewers got fewer than were sent), yet nothing lost.
    chat = result["chat"]
    assert chat["sent"] >= 40 and chat["latency"]["count"] > 0
    # and the part of it after the server took each message, timed on the same ones
    after = chat["after_post_latency"]
    assert after["count"] == chat["latency"]["count"]
    assert 0 < after["p50_ms"] <= chat["latency"]["p50_ms"] + 50  # clocks: wall vs monotonic
    # and the part before it, the same messages again
    assert chat["to_server_latency"]["count"] == chat["latency"]["count"]
    # By when each message was posted: the countdown's burst and storm before BUY NOW,
    # the storm through the rush (BUY NOW's request to the last buy reply), the rest
    # after; every timed message in one of them, each split at the server's acceptance.
    phases = chat["phases"]
    assert phases["rush_s"] > 0
    counts = [phases[p]["latency"]["count"] for p in ("before", "rush", "after")]
    assert counts[0] > 0 and counts[1] > 0 and sum(counts) == chat["latency"]["count"]
    for p in ("before", "rush", "after"):
        part = phases[p]
        assert part["to_server_latency"]["count"] == part["latency"]["count"]
        assert part["after_post_latency"]["count"] == part["latency"]["count"]
    assert chat["left_out_per_viewer"] > 0
    assert chat["received_per_viewer"] + chat["left_out_per_viewer"] >= chat["sent"] - 1
    creator = result["creator"]
    # Five probe drops, their first requests due within the countdown, each awaited
    # however slow the answer (an open schedule: a loaded machine gives slow probes,
    # not fewer of them); every request started is counted.
    assert creator["buy_now_ms"] > 0 and creator["probes"]["count"] >= 5
    assert creator["probe_errors"] == 0
    assert creator["probes_started"] == creator["probes"]["count"]
    floor = result["floor"]
    assert floor["measured"] and floor["viewers"] == 200
    assert floor["delivered"] == floor["expected"] == 600
    assert result["buy_now"]["floor_ratio"]["p99"] > 0
    rush_floor = result["rush_floor"]
    assert rush_floor["delivered"] == rush_floor["expected"] == 600
    assert rush_floor["rush"]["units_sold"] == 3 * 20 and rush_floor["rush"]["oversold"] == 0
    assert rush_floor["rush"]["buys"]["sent"] == 3 * res["sent"]  # the same buyers each time
    assert result["buy_now"]["rush_floor_ratio"]["p99"] > 0
    [chat_floor] = result["chat_floor"]["intervals"]
    assert chat_floor["batch_ms"] == 250 and chat_floor["sent"] >= 20
    assert chat_floor["delivered"] == chat_floor["expected"] == chat_floor["sent"] * 200
    assert chat_floor["per_viewer"]["min"] == chat_floor["sent"]
    assert chat_floor["latency"]["count"] == chat_floor["sent"] * 200  # 200 // 500: all
    assert 0 < chat_floor["latency"]["p50_ms"] <= chat_floor["latency"]["p99_ms"]
    assert result["chat_floor"]["best"]["batch_ms"] == 250
    assert chat["chat_floor_ratio"]["p99"] > 0 and chat["chat_floor_ratio"]["before_p99"] > 0
    # The load generator's own CPU, where it shares the machine with the server.
    gen = result["generator"]
    assert gen["drop"]["cpu_s"] > 0 and gen["drop"]["window_s"] > 1.5
    assert gen["floor"]["cpu_s"] >= 0 and gen["floor"]["window_s"] >= 1.0
    assert gen["rush_floor"]["cpu_s"] >= 0 and gen["rush_floor"]["window_s"] >= 1.0
    assert gen["drop"]["cpu_percent"] is not None
    paths = result["reports"]
    written = json.loads(Path(paths["json"]).read_text())
    assert written["passed"] is True and written["buy_now"]["histogram_ms"]
    assert written["config"]["chat_floor_intervals"] == [250]
    assert Path(paths["png"]).stat().st_size > 10_000
    assert "PASS" in Path(paths["html"]).read_text()


def test_status_line_shows_sockets_apart_from_joins() -> None:
    """A connect storm whose joins queue shows as many sockets and few joins."""
    from loadtest.rehearse import Rehearsal

    r = Rehearsal(RehearsalConfig(viewers=50_000))
    r.progress.latest = {1: {"sockets": 12_000, "ever_joined": 300, "joined": 290},
                         2: {"sockets": 12_500, "ever_joined": 400, "joined": 400}}
    line = r.status_line()
    assert "sockets  24,500" in line
    assert "joined     700/50,000" in line and "open     690" in line


async def test_a_slow_control_path_gives_slow_probes_not_fewer(monkeypatch) -> None:
    """Requests answered in 1.5 s, one due every 0.1 s for 0.85 s: each of the five
    drops starts one, every (slow) answer is counted, none cancelled; the two due
    while their drops still waited show as due but not started."""
    from loadtest import creator as creator_mod
    from loadtest.creator import ControlPathProbe

    async def post(self, name, path, body, ok=(200, 201)):
        if name == "create":
            return {"id": 1, "products": [{"product_id": i} for i in range(50)]}
        if name in ("buy_now", "close"):
            await asyncio.sleep(1.5)
        return {}

    monkeypatch.setattr(creator_mod.CreatorClient, "_post", post)
    probe = ControlPathProbe("http://127.0.0.1:9", "token")
    await probe.prepare()
    probe.start(0.1)
    await asyncio.sleep(0.85)
    await probe.stop()
    await probe.aclose()
    assert probe.started == len(probe.latencies) == 5
    assert min(probe.latencies) >= 1.5 and probe.errors == 0
    assert probe.due >= 8  # at 0.1 .. 0.8 s (more if this loop was slow to wake)


@pytest.mark.timeout(150)
def test_small_rehearsal_with_the_giveaway_scenario(tmp_path: Path) -> None:
    """Every viewer enters a giveaway between going live and BUY NOW; the draw is
    recomputed from PostgreSQL and matches what every viewer was shown."""
    cfg = RehearsalConfig(
        viewers=200, stock=20, server_workers=1, swarm_processes=2, connect_rate=1000,
        buy_probability=0.6, buy_delay_ms=(0, 50), chat_messages=0, countdown_s=1.0,
        probe_interval_s=0, floor=False, rush_timeout_s=15, max_duration_s=90,
        out_dir=str(tmp_path), quiet=True, p99_budget_ms=5000, command="test",
        giveaway=True, giveaway_window_s=3, giveaway_winners=3, enter_probability=0.9)
    result = asyncio.run(rehearse(cfg))
    assert result["failures"] == [] and result["passed"] is True
    g = result["giveaway"]
    assert 150 < g["entries_sent"] < 200  # 90 % of the viewers, spread evenly
    assert g["answered"] == g["new"] == g["entries_sent"] == g["entrants_acknowledged"]
    assert g["refused"] == {} and g["latency"]["count"] == g["entries_sent"]
    assert g["answers_per_s"] > 0 and g["answered_within_s"] <= 3
    a = g["audit"]
    assert a["checked"] and a["state"] == "drawn" and a["recomputed_ok"]
    assert len(a["winners"]) == 3
    assert a["shown_as_recomputed"] == 200 and a["shown_otherwise"] == 0
    assert a["entrants_in_postgresql"] == a["entrants_announced"] == g["entries_sent"]
    assert a["acknowledged_not_recorded"] == a["recorded_not_acknowledged"] == 0
    assert "_entrants" not in g  # not carried into the report
    # The drop itself still rushed as usual after the giveaway.
    assert result["reservations"]["held"] == 20 and result["audit"]["oversold"] == 0
    html = Path(result["reports"]["html"]).read_text()
    assert "giveaway draw from PostgreSQL" in html and "reproduced" in html


def test_the_giveaway_judge_fails_on_a_disputed_result() -> None:
    from loadtest import giveaway

    def result(**audit):
        base = {"checked": True, "state": "drawn", "recomputed_ok": True, "problems": [],
                "shown_as_recomputed": 10, "shown_otherwise": 0,
                "entrants_in_postgresql": 5, "entrants_announced": 5,
                "acknowledged_not_recorded": 0, "recorded_not_acknowledged": 0}
        return {"connections": {"open_at_end": 10},
                "giveaway": {"refused": {}, "answered": 5, "entries_sent": 5,
                             "audit": {**base, **audit}}}

    assert giveaway.judge(result()) == []
    for bad in ({"recomputed_ok": False}, {"shown_otherwise": 1},
                {"shown_as_recomputed": 9}, {"recorded_not_acknowledged": 1},
                {"entrants_announced": 4}, {"state": "open"}):
        assert giveaway.judge(result(**bad)), bad


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_small_rehearsal_with_variants_sells_every_variant_out(tmp_path: Path) -> None:
    """``--variants 3``: the product comes in three sizes sharing the stock; each buyer
    picks one with units left from BUY NOW's list. Exactly ``stock`` holds, no variant
    oversold (the audit counts each variant against its own units)."""
    cfg = RehearsalConfig(
        viewers=200, stock=21, variants=3, server_workers=1, swarm_processes=2,
        connect_rate=1000, buy_probability=0.8, buy_delay_ms=(0, 50), chat_messages=0,
        countdown_s=1.5, probe_interval_s=0, floor=False, rush_timeout_s=15,
        max_duration_s=90, out_dir=str(tmp_path), quiet=True, p99_budget_ms=5000,
        command="test")
    result = asyncio.run(rehearse(cfg))
    assert result["failures"] == [] and result["passed"] is True
    res = result["reservations"]
    assert res["held"] == 21
    assert res["held"] + res["sold_out"] + res["rejected"] == res["sent"]
    audit = result["audit"]
    assert audit["checked"] and audit["oversold"] == 0 and audit["active_orders"] == 21
    assert sorted(v["active_orders"] for v in audit["variants"].values()) == [7, 7, 7]
    assert audit["redis_remaining"] == {str(result["drop"]["product_ids"][0]): 0}


def test_the_countdown_is_drawn_off_the_chat_beat_when_asked() -> None:
    """A big room's chat goes out on a ~1 s beat from go-live: a fixed countdown puts
    BUY NOW at the same point of it in every run of one server (docs/benchmarks.md).
    --countdown-jitter S draws it from [countdown, countdown + S] per run."""
    import argparse
    import random

    from loadtest import rehearse_cli

    parser = argparse.ArgumentParser()
    rehearse_cli.add_arguments(parser)
    args = parser.parse_args(["--countdown", "5", "--countdown-jitter", "1"])
    assert (args.countdown_s, args.countdown_jitter_s) == (5.0, 1.0)
    cfg = RehearsalConfig(countdown_s=5.0, countdown_jitter_s=1.0)
    rng = random.Random(4)
    drawn = [cfg.draw_countdown(rng) for _ in range(200)]
    assert all(5.0 <= d <= 6.0 for d in drawn)
    assert max(drawn) - min(drawn) > 0.8  # spread over the whole beat
    assert RehearsalConfig(countdown_s=5.0).draw_countdown(rng) == 5.0  # no jitter
