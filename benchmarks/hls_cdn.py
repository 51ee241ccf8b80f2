"""LL-HLS behind a caching proxy: origin requests per second per 1,000 viewers.

One ``dropserver dev`` origin (one worker) with a creator publishing over WHIP (FFmpeg's
own muxer, libx264 in real time: ``tests.whip_publisher``), nginx in front with the
documented configuration (``loadtest/nginx-cdn.conf``), and simulated LL-HLS viewers
(:mod:`loadtest.hls_viewers`: a preload-hinted part and a blocking playlist reload per
part, two keep-alive connections each) through the proxy. For each number of viewers:
HLS requests that reached the origin per second (its ``dropserver_hls_requests_total``,
read before and after), the same per 1,000 viewers, and part latency (a part's file
written at the origin -> its last byte at a viewer; same machine, same clock). Beside
it, the servers' wait: how long the proxy and origin took to answer a part or a
blocking playlist reload after it existed and was asked for (a viewer's own loop lag,
which makes it ask late, is in the part latency, not in the wait).
The baseline, same run: viewers straight at the origin, no proxy.

    python -m benchmarks.hls_cdn [--viewers 100,1000,5000] [--direct 100] [--seconds 20]

Goal: origin requests stay flat (within 2x) from 100 to 5,000 viewers behind the
proxy; part latency p99 <= 1 s. Run under the bench lock (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.cdn import Cdn
from loadtest.hls_viewers import PartTimes, ViewerStats

__all__ = ["Rig", "case_figures", "main", "origin_hls_requests",
           "origin_hls_requests_by_kind"]


def origin_hls_requests_by_kind(metrics: str) -> dict[str, float]:
    """``dropserver_hls_requests_total`` by kind."""
    return {kind: float(value) for kind, value in re.findall(
        r'^dropserver_hls_requests_total\{kind="(\w+)"\} (\S+)$', metrics, re.M)}


def origin_hls_requests(metrics: str) -> float:
    """Sum of ``dropserver_hls_requests_total`` over its kinds, ``missing`` left out
    (a 404 is also counted under its kind)."""
    return sum(v for kind, v in origin_hls_requests_by_kind(metrics).items()
               if kind != "missing")


@dataclass
class Rig:
    """An origin (``dropserver dev`` on the given Redis and PostgreSQL), a drop with a
    publisher on it, and nginx in front. ``async with Rig(...) as rig``."""

    redis_url: str
    database_url: str
    work: Path
    publish_seconds: float = 120.0
    origin: Any = None
    cdn: Cdn | None = None
    drop_id: int = 0
    publisher: Any = None
    http: httpx.AsyncClient | None = field(default=None, repr=False)

    async def __aenter__(self) -> Rig:
        from benchmarks._stream import create_drop
        from benchmarks._support import start_dev
        from tests.whip_publisher import WhipPublisher

        media = self.work / "media"
        self.origin = await asyncio.to_thread(start_dev, {
            "REDIS_URL": self.redis_url, "DATABASE_URL": self.database_url,
            "DROPSERVER_MEDIA_DIR": str(media), "DROPSERVER_WORKERS": "1"})
        try:
            self.http = httpx.AsyncClient(base_url=self.origin.base_url, timeout=30)
            self.drop_id = await create_drop(self.http, self.origin.token)
            self.publisher = WhipPublisher(
                f"{self.origin.base_url}/v1/drops/{self.drop_id}/whip", self.origin.token,
                seconds=self.publish_seconds, audio=False)
            self.publisher.start()
            self.part_times = PartTimes(media / "drops" / str(self.drop_id))
            origin_addr = self.origin.base_url.removeprefix("http://").rstrip("/")
            self.cdn = Cdn(self.work / "nginx", origin_addr)
            await asyncio.to_thread(self.cdn.start)
            deadline = time.monotonic() + 30
            while not (self.part_times.directory / "s1.m4s").exists():
                if time.monotonic() > deadline or self.publisher.proc.poll() is not None:
                    raise RuntimeError("the publisher put no segment on the playlist in 30 s")
                await asyncio.sleep(0.1)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.publisher is not None:
            self.publisher.kill()
        if self.cdn is not None:
            self.cdn.stop()
        if self.http is not None:
            await self.http.aclose()
        if self.origin is not None:
            await asyncio.to_thread(self.origin.stop)

    async def origin_requests(self) -> dict[str, float]:
        """The origin's HLS requests so far, by kind."""
        assert self.http is not None
        return origin_hls_requests_by_kind((await self.http.get("/metrics")).text)

    async def _viewers(self, url: str, viewers: int, seconds: float,
                       ramp: float, trace: Path | None = None) -> dict[str, Any]:
        """One ``python -m loadtest.hls_viewers`` process; its figures."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.hls_viewers", url, str(self.drop_id),
            str(viewers), str(seconds), "--ramp", str(ramp),
            "--parts-dir", str(self.part_times.directory),
            *(["--trace", str(trace)] if trace is not None else []),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"viewers exited {proc.returncode}: {err.decode()[-2000:]}")
        return json.loads(out)

    async def watch(self, viewers: int, seconds: float, *, through_cdn: bool = True,
                    processes: int = 1, probes: int = 0, ramp: float = 2.0,
                    trace: Path | None = None) -> dict[str, Any]:
        """``viewers`` split over ``processes`` for ``seconds``, and ``probes`` more in
        a process of their own: a few viewers on an idle event loop, whose part latency
        is the proxy's, not a saturated client's. Origin requests are counted from the
        end of the ramp (plus a second) to the end: the steady state, not the tune-in.
        ``trace``: the probes' every request written to that file (JSON lines), and
        when each part was written beside it (``.parts``)."""
        assert self.cdn is not None
        url = self.cdn.url if through_cdn else self.origin.base_url
        window = {}

        async def count() -> None:
            await asyncio.sleep(ramp + 1)
            window["start"] = (time.monotonic(), await self.origin_requests())
            await asyncio.sleep(max(1.0, seconds - ramp - 1.5))
            window["end"] = (time.monotonic(), await self.origin_requests())

        counter = asyncio.create_task(count())
        shares = [viewers // processes + (k < viewers % processes) for k in range(processes)]
        runs = [self._viewers(url, n, seconds, ramp) for n in shares if n]
        if probes:
            runs.append(self._viewers(url, probes, seconds, ramp, trace))
        outs = await asyncio.gather(*runs)
        await counter
        crowd = ViewerStats()
        for out in outs[:len(outs) - (1 if probes else 0)]:
            crowd.merge(out)
        probe = None
        if probes:
            probe = ViewerStats()
            probe.merge(outs[-1])
        (t0, k0), (t1, k1) = window["start"], window["end"]
        by_kind = {kind: round((k1[kind] - k0.get(kind, 0.0)) / (t1 - t0), 2)
                   for kind in k1 if k1[kind] != k0.get(kind, 0.0)}
        total = sum(v for kind, v in by_kind.items() if kind != "missing")
        fig = case_figures(crowd, total, through_cdn, seconds, probe)
        fig["origin_rps_by_kind"] = by_kind
        return fig


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def case_figures(stats: ViewerStats, origin_rps: float, through_cdn: bool,
                 seconds: float, probe: ViewerStats | None = None) -> dict[str, Any]:
    lat = stats.latencies
    out = {
        "viewers": stats.viewers, "through_cdn": through_cdn, "started": stats.started,
        "origin_rps": round(origin_rps, 1),
        "origin_rps_per_1000": round(origin_rps * 1000 / max(1, stats.viewers), 1),
        "viewer_rps": round(stats.requests / seconds, 1),
        "parts": stats.parts, "parts_per_viewer_s": round(stats.parts / max(
            1, stats.viewers) / seconds, 2),
        "mbit_s": round(stats.bytes * 8 / seconds / 1e6, 1),
        "latency_p50_s": round(_pct(lat, 0.5), 3), "latency_p99_s": round(_pct(lat, 0.99), 3),
        "latency_max_s": round(max(lat), 3) if lat else float("nan"),
        "wait_p99_s": round(_pct(stats.waits, 0.99), 3),
        "loop_lag_p99_s": round(_pct(stats.loop_lag, 0.99), 3),
        "statuses": dict(stats.statuses), "cache": dict(stats.cache),
        "errors": dict(stats.errors), "odd": stats.odd[:5],
    }
    if probe is not None:
        out.update({"probes": probe.viewers, "probe_parts": probe.parts,
                    "probe_wait_p99_s": round(_pct(probe.waits, 0.99), 3),
                    "probe_wait_max_s": round(max(probe.waits), 3)
                    if probe.waits else float("nan"),
                    "probe_loop_lag_max_s": round(max(probe.loop_lag), 3)
                    if probe.loop_lag else float("nan"),
                    "probe_late": probe.late[:5], "probe_odd": probe.odd[:5],
                    "probe_latency_p50_s": round(_pct(probe.latencies, 0.5), 3),
                    "probe_latency_p99_s": round(_pct(probe.latencies, 0.99), 3),
                    "probe_latency_max_s": round(max(probe.latencies), 3)
                    if probe.latencies else float("nan")})
    return out


async def _run(args: argparse.Namespace, redis_url: str, database_url: str,
               work: Path) -> list[dict[str, Any]]:
    cases = [(n, False) for n in args.direct] + [(n, True) for n in args.viewers]
    total = sum(max(2.0, n / 500) + args.seconds + 5 for n, _ in cases) + 30
    results = []
    async with Rig(redis_url, database_url, work, publish_seconds=total) as rig:
        for n, through in cases:
            load = os.getloadavg()[0]
            ramp = max(2.0, n / 500)  # viewers join at 500 a second
            trace = None
            if args.trace_dir is not None:
                trace = args.trace_dir / f"probes-{n}-{'cdn' if through else 'direct'}.jsonl"
            fig = await rig.watch(n, ramp + args.seconds, through_cdn=through,
                                  processes=args.processes, probes=args.probes, ramp=ramp,
                                  trace=trace)
            fig["load_before"] = round(load, 2)
            results.append(fig)
            print(json.dumps(fig), flush=True)
            await asyncio.sleep(2)  # the previous viewers' sockets closed
    return results


def main() -> None:
    from benchmarks._support import raise_nofile
    from dropserver.services import LocalServices

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", default="100,1000,5000",
                        help="viewers through the proxy, one case each")
    parser.add_argument("--direct", default="100",
                        help="viewers straight at the origin (the baseline); '' for none")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="per case, after the viewers have joined (500 a second)")
    parser.add_argument("--processes", type=int, default=2,
                        help="viewer processes sharing each case's crowd")
    parser.add_argument("--probes", type=int, default=20,
                        help="viewers in a process of their own, timed on an idle loop")
    parser.add_argument("--trace-dir", type=Path,
                        help="write each case's probe requests there (JSON lines: probe, "
                             "asked, answered, path, status, X-Cache-Status) and when "
                             "each part was written (.parts)")
    args = parser.parse_args()
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    args.viewers = [int(x) for x in args.viewers.split(",") if x]
    args.direct = [int(x) for x in args.direct.split(",") if x]
    raise_nofile()
    with LocalServices() as services, tempfile.TemporaryDirectory(prefix="bench-cdn-") as work:
        results = asyncio.run(_run(args, services.redis_url, services.database_url,
                                   Path(work)))
    print("\nviewers  proxy  origin req/s  per 1,000 viewers  viewer req/s  "
          "part latency p50 / p99 (probes p50 / p99)  probes' server wait p99  "
          "client loop lag p99")
    for r in results:
        print(f"{r['viewers']:>7}  {'yes' if r['through_cdn'] else 'no ':>5}  "
              f"{r['origin_rps']:>12}  {r['origin_rps_per_1000']:>17}  {r['viewer_rps']:>12}  "
              f"{r['latency_p50_s']} / {r['latency_p99_s']} s "
              f"({r.get('probe_latency_p50_s')} / {r.get('probe_latency_p99_s')} s)  "
              f"{r.get('probe_wait_p99_s')} s  "
              f"{r['loop_lag_p99_s']} s")


if __name__ == "__main__":
    main()
