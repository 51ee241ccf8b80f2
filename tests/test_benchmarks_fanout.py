"""The fan-out benchmark's ratios (benchmarks/fanout.py): the gateway against each
bare baseline measured in the run, the one without pings and the one with websockets'
default keepalive, named apart."""

from __future__ import annotations

import pytest

from benchmarks.fanout import BASELINE_PING_INTERVAL_S, idle_figures, ratios


def _server(p99: float, cpu: float, connect: float, net: float | None = None
            ) -> dict[str, float]:
    out = {"p99_ms": p99, "server_cpu_us_per_delivery": cpu, "connect_s": connect}
    if net is not None:
        out["server_cpu_us_per_delivery_net"] = net
    return out


def test_ratios_against_both_baselines():
    results = {"gateway": _server(180, 12.0, 9.0), "baseline": _server(200, 8.0, 7.5),
               "baseline-ping": _server(180, 10.0, 8.0)}
    assert ratios(results) == {
        "p99_ratio": 0.9, "cpu_ratio": 1.5, "connect_ratio": 1.2,
        "p99_ratio_ping": 1.0, "cpu_ratio_ping": 1.2, "connect_ratio_ping": 1.12}


def test_net_cpu_ratios_when_idle_was_measured():
    results = {"gateway": _server(180, 12.0, 9.0, net=6.0),
               "baseline": _server(200, 8.0, 7.5, net=8.0),
               "baseline-ping": _server(180, 10.0, 8.0, net=7.5)}
    out = ratios(results)
    assert out["cpu_net_ratio"] == 0.75 and out["cpu_net_ratio_ping"] == 0.8


def test_idle_figures_take_the_idle_rate_out_of_the_events_window():
    # 3 s of CPU in a 20 s window of 200,000 deliveries; 0.5 s idle in 5 s: 0.1 s/s.
    out = idle_figures(3.0, 20.0, 0.5, 5.0, 200_000)
    assert out["server_cpu_ms_per_s_idle"] == 100.0
    assert out["server_cpu_us_per_delivery_net"] == pytest.approx(5.0)
    assert idle_figures(3.0, 20.0, None, 0.0, 200_000) == {}


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
