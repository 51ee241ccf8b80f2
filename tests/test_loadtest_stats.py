"""loadtest.stats: nearest-rank percentiles, summaries and histograms (pure)."""

from __future__ import annotations

import pytest

from loadtest.stats import histogram, percentile, summarize


def test_percentile_is_nearest_rank_and_an_observed_sample() -> None:
    values = sorted(float(i) for i in range(1, 101))  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0.5) == 1.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [0, -1, 100.1])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_reports_milliseconds() -> None:
    # 1000 samples: 990 at 10 ms and 10 at 900 ms -> p99 is still 10 ms, max 900 ms.
    values = [0.010] * 990 + [0.900] * 10
    out = summarize(values)
    assert out["count"] == 1000
    assert out["p50_ms"] == 10.0
    assert out["p95_ms"] == 10.0
    assert out["p99_ms"] == 10.0
    assert out["max_ms"] == 900.0
    assert out["min_ms"] == 10.0
    assert out["mean_ms"] == pytest.approx(18.9)
    # One more slow sample moves p99 over the line.
    assert summarize([0.010] * 98 + [0.900] * 2)["p99_ms"] == 900.0


def test_summarize_of_nothing_says_nothing_measured() -> None:
    out = summarize([])
    assert out["count"] == 0
    assert out["p99_ms"] is None and out["max_ms"] is None


def test_histogram_keeps_empty_buckets_between() -> None:
    assert histogram([0.001, 0.004, 0.031], bucket_ms=10) == [(0.0, 2), (10.0, 0), (20.0, 0),
                                                              (30.0, 1)]
    assert histogram([]) == []
    with pytest.raises(ValueError):
        histogram([0.1], bucket_ms=0)
