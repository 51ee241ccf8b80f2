"""The fan-out benchmark's ratios (benchmarks/fanout.py): the gateway against each
bare baseline measured in the run, the one without pings and the one with websockets'
default keepalive, named apart."""

from __future__ import annotations

from benchmarks.fanout import BASELINE_PING_INTERVAL_S, ratios


def _server(p99: float, cpu: float, connect: float) -> dict[str, float]:
    return {"p99_ms": p99, "server_cpu_us_per_delivery": cpu, "connect_s": connect}


def test_ratios_against_both_baselines():
    results = {"gateway": _server(180, 12.0, 9.0), "baseline": _server(200, 8.0, 7.5),
               "baseline-ping": _server(180, 10.0, 8.0)}
    assert ratios(results) == {
        "p99_ratio": 0.9, "cpu_ratio": 1.5, "connect_ratio": 1.2,
        "p99_ratio_ping": 1.0, "cpu_ratio_ping": 1.2, "connect_ratio_ping": 1.12}


def test_ratios_only_for_the_servers_measured():
    results = {"gateway": _server(180, 12.0, 9.0), "baseline": _server(200, 8.0, 7.5)}
    assert set(ratios(results)) == {"p99_ratio", "cpu_ratio", "connect_ratio"}
    bids = {"gateway-bids": _server(300, 1, 1), "baseline": _server(200, 8.0, 7.5)}
    assert ratios(bids) == {"bid_p99_ratio": 1.5}


def test_the_pinging_baseline_keeps_websockets_default():
    import inspect

    from websockets.asyncio.server import serve

    assert BASELINE_PING_INTERVAL_S == inspect.signature(serve).parameters[
        "ping_interval"].default == 20
