"""What the benchmarks share (benchmarks/_support.py), and that every benchmark still
starts from its home in benchmarks/ (its imports resolve, its options parse)."""

from __future__ import annotations

import ast
import json
import math
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from benchmarks._support import pcts, start_dev

ROOT = Path(__file__).parent.parent
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                    if not p.stem.startswith("_"))


def test_every_benchmark_is_found():
    assert BENCHMARKS == ["balancer", "bids", "buy_cpu", "buy_now", "churn", "cluster_clients",
                          "failover", "fanout", "faults", "giveaway", "hls_cdn", "idle",
                          "ingest", "join_burst", "orders", "reserve", "reserve_script",
                          "startup", "swarm_recv"]


@pytest.mark.parametrize("name", [*BENCHMARKS, "_bare"])
def test_benchmark_answers_help(name):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# The three cheapest benchmarks, run small from their home, end to end: each starts
# its own services and servers (seconds each; more on a loaded machine).
@pytest.mark.slow
def test_startup_benchmark_runs():
    result = json.loads(_run("benchmarks.startup", "--runs", "1"))
    assert len(result["runs_s"]) == 1 and 0 < result["median_s"] == result["max_s"]


@pytest.mark.slow
def test_buy_now_benchmark_runs():
    result = json.loads(_run("benchmarks.buy_now", "--drops", "2"))
    assert result["drops"] == 2
    assert set(result["ms"]) == {"live_http", "buy_now_event", "buy_now_http", "end_http"}
    assert all(0 < step["p50"] <= step["max"] for step in result["ms"].values())


@pytest.mark.slow
@pytest.mark.parametrize("gateway", ["fake", "stub"])
def test_orders_benchmark_pays_every_order(gateway):
    result = ast.literal_eval(_run("benchmarks.orders", "--orders", "20", "--gateway",
                                   gateway).strip().splitlines()[-1])
    assert result["orders"] == 20 and result["intents"] == 20
    assert result["orders_per_s"] > 0


@pytest.mark.slow
def test_swarm_recv_benchmark_reads_every_position(tmp_path):
    """The generator's reading cost, small: a real swarm process reads every batch,
    with no gap, and the figures come out."""
    out = tmp_path / "recv.json"
    _run("benchmarks.swarm_recv", "--sockets", "100", "--batches", "3", "--runs", "1",
         "--interval", "0.05", "--json", str(out))
    [run] = json.loads(out.read_text())
    assert run["checks"]["joined"] == run["checks"]["ended_seen"] == 100
    assert (run["checks"]["gaps"], run["checks"]["out_of_order"]) == (0, 0)
    assert run["checks"]["chat_seen"] == 100 * 3 * 20
    assert run["cpu_s"] >= 0 and run["us_per_message"] >= 0  # 100 sockets: ticks of 10 ms


def test_pcts():
    figures = pcts([float(v) for v in range(100, 0, -1)])  # 1..100, any order
    assert figures == {"n": 100, "p50": 50.5, "p95": 95.0, "max": 100.0}
    assert pcts([7.0]) == {"n": 1, "p50": 7.0, "p95": 7.0, "max": 7.0}
    empty = pcts([])
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("p50", "p95", "max"))


def test_start_dev_reads_the_banner_and_stops_with_its_services():
    server = start_dev()
    try:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.redis_url.startswith("redis://127.0.0.1:")
        assert server.token.count(".") == 2  # a JWT
        with urllib.request.urlopen(server.base_url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.stop()
    assert server.proc.returncode is not None
    port = int(server.redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError):  # its Redis went with it
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_top_frames_reads_py_spys_collapsed_stacks(tmp_path):
    from benchmarks._support import top_frames

    path = tmp_path / "server.txt"
    path.write_text(
        "process 1:\"serve\";main (a.py:1);handle (b.py:2);write (c.py:3) 6\n"
        "process 1:\"serve\";main (a.py:1);handle (b.py:2) 3\n"
        "process 2:\"serve\";main (a.py:1);read (d.py:4) 1\n")
    frames = top_frames(str(path), n=2)
    assert frames["samples"] == [("all", 10.0)]
    assert frames["self"] == [("write (c.py:3)", 0.6), ("handle (b.py:2)", 0.3)]
    assert frames["total"] == [("main (a.py:1)", 1.0), ("handle (b.py:2)", 0.9)]
