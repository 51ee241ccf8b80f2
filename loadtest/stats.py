"""Pure statistics for rehearsals: percentiles, latency summaries, histograms.

No I/O. Latencies are seconds (floats); summaries report milliseconds, rounded to
0.1 ms, because that is what people read. Percentiles are nearest-rank (the value
below which at least q% of the samples lie), so p100 is the maximum and a
percentile is always a sample that was actually observed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["histogram", "percentile", "summarize"]

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def summarize(values: Iterable[float],
              qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float | int | None]:
    """``{count, min_ms, p50_ms, p95_ms, p99_ms, max_ms, mean_ms}`` of latencies in s.

    With no samples every figure is ``None`` and count is 0, so a report says
    "nothing measured" instead of inventing a zero.
    """
    data = sorted(values)
    out: dict[str, float | int | None] = {"count": len(data)}
    keys = ["min_ms", *(f"p{_qname(q)}_ms" for q in qs), "max_ms", "mean_ms"]
    if not data:
        out.update(dict.fromkeys(keys))
        return out
    out["min_ms"] = _ms(data[0])
    for q in qs:
        out[f"p{_qname(q)}_ms"] = _ms(percentile(data, q))
    out["max_ms"] = _ms(data[-1])
    out["mean_ms"] = _ms(math.fsum(data) / len(data))
    return out


def _qname(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q).replace(".", "_")


def histogram(values: Iterable[float], bucket_ms: float = 10.0) -> list[tuple[float, int]]:
    """Fixed-width histogram of latencies (s): ``[(bucket_start_ms, count), ...]``.

    Empty buckets between the first and last are kept so a plot shows the gaps.
    """
    if bucket_ms <= 0:
        raise ValueError("bucket_ms must be positive")
    counts: dict[int, int] = {}
    for v in values:
        index = int(v * 1000.0 // bucket_ms)
        counts[index] = counts.get(index, 0) + 1
    if not counts:
        return []
    lo, hi = min(counts), max(counts)
    return [(round(i * bucket_ms, 3), counts.get(i, 0)) for i in range(lo, hi + 1)]
