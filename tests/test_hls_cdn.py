"""LL-HLS behind nginx as a caching proxy (the CDN stand-in), with the configuration
docs/streaming.md documents: simulated LL-HLS viewers through the proxy cost the
origin about one request per part and kind, however many they are, and get each part
soon after the origin wrote it.

A real origin (``dropserver dev``) with a creator publishing over WHIP (FFmpeg's muxer),
real nginx, viewers in processes of their own (:mod:`loadtest.hls_viewers`); requests
that reach the origin are read from its ``dropserver_hls_requests_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.hls_cdn import Rig
from loadtest.cdn import TEMPLATE, Cdn, find_nginx, render
from loadtest.hls_viewers import hint_of, run_viewers
from streaming.packager import Packager
from tests.conftest import running
from tests.test_hls_cache import Feeder, metric
from tests.test_streaming_packager import FPS
from tests.test_whip import make_drop

ROOT = Path(__file__).resolve().parents[1]
HAVE_NGINX = bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
needs_nginx = pytest.mark.skipif(not HAVE_NGINX, reason="nginx is not installed")

PARTS_PER_S = 5  # DROPSERVER_HLS_PART_SECONDS 0.2, the default
# What one part may cost the origin behind the proxy: the part (a blocking request for
# the preload hint) and the blocking playlist reload that lists it. Besides, at most one
# live.m3u8 a second (it is cached for a second) and a few stragglers.
ORIGIN_RPS_BOUND = 2 * PARTS_PER_S + 3


@needs_nginx
def test_the_template_renders_and_nginx_accepts_it(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(listen="127.0.0.1:9", origin="127.0.0.1:8000",
                           cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path)))
    assert "@" not in conf.read_text()
    check = subprocess.run([find_nginx(), "-t", "-p", str(tmp_path), "-c", str(conf)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    with pytest.raises(KeyError):
        render(listen="x", origin="y", cache_dir="z", run_dir="w",
               template=TEMPLATE.read_text() + "\n# @UNKNOWN@\n")


def test_the_streaming_guide_shows_the_configuration_the_tests_run() -> None:
    """docs/streaming.md quotes loadtest/nginx-cdn.conf whole: one configuration, tested."""
    guide = (ROOT / "docs" / "streaming.md").read_text()
    assert TEMPLATE.read_text().strip() in guide


def test_the_viewers_follow_the_preload_hint() -> None:
    text = ('#EXT-X-PART:DURATION=0.2,URI="s7.3.m4s"\n'
            '#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s7.4.m4s"\n')
    assert hint_of(text) == (7, 4)
    assert hint_of("#EXTM3U\n#EXT-X-ENDLIST\n") is None


@needs_nginx
async def test_a_stalled_publisher_costs_the_origin_one_request_not_one_per_viewer(
        settings, tmp_path: Path) -> None:
    """The publisher stops mid-segment: 20 viewers wait through the proxy for the next
    part (the blocking reload and the hinted part). The origin holds the one request
    per key that reaches it for three target durations and answers 503 / 404; every
    viewer gets that answer then, and the origin sees no more. (With a 503 the proxy
    may not cache, they reached the origin one at a time, the last after nginx's lock
    timeout.)"""
    drop_id = await make_drop(settings.database_url)
    feeder = Feeder(Packager(Path(settings.media_dir) / "drops" / str(drop_id)))
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)
    hint = feeder.packager.playlist.preload_uri
    msn, part = hint[1:-4].split(".")
    async with running(settings) as server:
        with Cdn(tmp_path / "nginx", server.base_url.removeprefix("http://")) as cdn:
            async with httpx.AsyncClient(base_url=cdn.url, timeout=30) as http, \
                    httpx.AsyncClient(base_url=server.base_url) as origin:
                before = (await origin.get("/metrics")).text
                hls = f"/v1/drops/{drop_id}/hls"
                started = time.monotonic()

                async def viewer(path: str) -> tuple[int, float]:
                    r = await http.get(path)
                    return r.status_code, time.monotonic() - started

                answers = await asyncio.gather(*(
                    viewer(f"{hls}/live.m3u8?_HLS_msn={msn}&_HLS_part={part}")
                    for _ in range(20)), *(viewer(f"{hls}/{hint}") for _ in range(20)))
                after = (await origin.get("/metrics")).text
    playlist, parts = answers[:20], answers[20:]
    assert {status for status, _ in playlist} == {503}, playlist
    assert {status for status, _ in parts} == {404}, parts
    # The origin's hold is 3 s; nginx looks at waiters every 0.5 s. (One at a time,
    # the last waiter was answered after 9 s, near nginx's 10 s lock timeout.)
    assert max(at for _, at in answers) < 8.0, answers
    for kind in ("blocking_playlist", "part"):
        assert metric(after, kind) - metric(before, kind) <= 2, kind


_PART = re.compile(r'#EXT-X-PART:[^\n]*URI="(s\d+\.\d+\.m4s)"')


@needs_nginx
async def test_a_viewer_tuning_in_gets_the_live_playlist_no_older_than_its_max_age(
        settings, tmp_path: Path) -> None:
    """A viewer who tunes in (or loads the playlist again after a 503) when the
    proxy's copy of ``live.m3u8`` has expired gets one whose newest part is at most the
    playlist's max-age (1 s) plus a part old. The proxy must not answer with the
    expired copy while it fetches a new one (nginx ``proxy_cache_use_stale updating``
    with ``proxy_cache_background_update``): that copy is as old as the last time
    anyone asked for the plain playlist, which at the live edge (viewers ask for
    blocking reloads) can be many seconds; the viewer then asks for those old parts
    and plays that far behind (seen in benchmarks.hls_cdn: parts reached probes 9-10 s
    after they were written, every one a cache HIT)."""
    drop_id = await make_drop(settings.database_url)
    directory = Path(settings.media_dir) / "drops" / str(drop_id)
    feeder = Feeder(Packager(directory), seconds=12.0)
    feeder.until(lambda: len(feeder.packager.playlist.segments) >= 1)

    async def publish() -> None:  # a part every 0.2 s, as a publisher does
        while feeder.next < len(feeder.frames) - 2 * FPS:
            feeder.parts(1)
            await asyncio.sleep(1 / PARTS_PER_S)

    def newest_part_age(text: str, asked: float) -> float:
        """How long before ``asked`` the newest part the playlist lists was written
        (the time the answer took on its way is not counted)."""
        names = _PART.findall(text)
        assert names, text
        return asked - (directory / names[-1]).stat().st_mtime

    async with running(settings) as server:
        with Cdn(tmp_path / "nginx", server.base_url.removeprefix("http://")) as cdn:
            publisher = asyncio.create_task(publish())
            try:
                async with httpx.AsyncClient(base_url=cdn.url, timeout=10) as http:
                    live = f"/v1/drops/{drop_id}/hls/live.m3u8"
                    first = await http.get(live)
                    assert first.status_code == 200, first.text
                    assert first.headers["cache-control"] == "public, max-age=1"
                    # nginx keeps expiry in whole seconds: a copy cached at t is
                    # fresh until the end of the second after t's.
                    await asyncio.sleep(2.5)
                    asked = time.time()
                    later = await http.get(live)
                    age = newest_part_age(later.text, asked)
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
    assert later.status_code == 200, later.text
    assert age <= 1.0 + 1 / PARTS_PER_S, (age, later.headers.get("x-cache-status"))


async def test_a_viewer_tells_the_servers_wait_from_its_own_lag() -> None:
    """A part and its blocking reload held 0.4 s by the server are 0.4 s of the
    servers' wait; a part asked 5 s after it was written and answered at once is 5 s
    of part latency (the viewer's lag) and no wait."""
    hold = 0.4
    served: dict[str, float] = {}

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the viewer closed its connection
                writer.close()
                return
            path = head.split(b" ")[1].decode()
            if path.endswith("/live.m3u8"):  # the first load: the hints of two parts
                body = '#EXTM3U\n#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s1.0.m4s"\n'
            elif "_HLS_msn=1&_HLS_part=0" in path:
                await asyncio.sleep(hold)
                body = '#EXTM3U\n#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s1.1.m4s"\n'
            elif "_HLS_msn=1&_HLS_part=1" in path:
                body = "#EXTM3U\n#EXT-X-ENDLIST\n"
            elif path.endswith("/s1.0.m4s"):
                served.setdefault("s1.0.m4s", time.time())
                await asyncio.sleep(hold)
                body = "part"
            else:
                body = "part"
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
                         f"{body}".encode())
            await writer.drain()

    def written(name: str) -> float | None:
        # s1.0 exists once asked (the origin holds it); s1.1 was written 5 s ago
        return served["s1.0.m4s"] if name == "s1.0.m4s" else time.time() - 5

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        stats = await run_viewers(f"http://127.0.0.1:{port}", 1, 1, 10,
                                  written=written, ramp=0, trace=True)
    assert stats.errors == {} and stats.parts == 2, stats
    # the trace: every request, when it was asked and answered
    assert stats.trace is not None and len(stats.trace) == stats.requests == 5, stats.trace
    held = [row for row in stats.trace if row[3].endswith("/s1.0.m4s")]
    assert len(held) == 1 and held[0][4] == 200 and held[0][2] - held[0][1] >= hold - 0.05
    # s1.1 and its reload answered at once; s1.0 and its reload held
    quick_part, quick_reload, held_part, held_reload = sorted(stats.waits)
    assert quick_reload < 0.2 and quick_part < 0.2, stats.waits
    assert hold - 0.05 <= held_part <= held_reload <= hold + 0.5, stats.waits
    assert max(stats.latencies) >= 4.9, stats.latencies


def _check_viewers(fig: dict) -> None:
    assert fig["started"] == fig["viewers"], fig
    assert fig["errors"] == {}, fig
    assert set(fig["statuses"]) <= {200, 503}, fig
    assert fig["parts"] > 0


@pytest.mark.timeout(240)
@needs_nginx
async def test_viewers_behind_the_proxy_cost_the_origin_one_request_per_part(
        settings, tmp_path: Path) -> None:
    """50 viewers through the proxy cost the origin what one viewer does (one blocking
    reload and one part request per part), not fifty times that; parts reach them
    soon after the origin wrote them. (The slow test below adds viewers straight at
    the origin, and ten times as many through the proxy.)"""
    async with Rig(settings.redis_url, settings.database_url, tmp_path,
                   publish_seconds=30) as rig:
        proxied = await rig.watch(50, 6, through_cdn=True, probes=5)
    _check_viewers(proxied)
    assert proxied["origin_rps"] <= ORIGIN_RPS_BOUND, proxied
    assert proxied["viewer_rps"] > 5 * proxied["origin_rps"], proxied
    assert proxied["cache"].get("HIT", 0) > 10 * proxied["cache"].get("MISS", 0), proxied
    assert proxied["probe_latency_p50_s"] <= 1.0, proxied


@pytest.mark.slow
@pytest.mark.timeout(420)  # three crowds and an origin; 80-190 s on a loaded 2-core VM
@needs_nginx
async def test_origin_requests_stay_flat_from_100_to_1000_viewers(settings,
                                                                   tmp_path: Path) -> None:
    """20 viewers straight at the origin cost it all their requests. Through the
    proxy, the goal's shape at the scale a test can afford (benchmarks.hls_cdn goes to
    5,000): ten times the viewers, origin requests within 2x. Part latency, for viewers
    timed on an idle loop: the goal (p99 within a second) is the benchmark's, run
    alone on the machine; here, on a machine shared with other tests, a median
    within a second, and the proxy and origin answering 99% of parts and blocking
    reloads within two seconds of the part existing and being asked for (a collapse
    that fails, or a lock that times out, shows as answers seconds late). Not the
    p99 of part latency itself: a probe process starved of CPU by a test beside this
    one asks seconds late and gets a cached part at once (seen in CI: parts asked
    ~9 s after they were written, answered in 2 ms); that lag is the client's."""
    async with Rig(settings.redis_url, settings.database_url, tmp_path,
                   publish_seconds=80) as rig:
        direct = await rig.watch(20, 6, through_cdn=False)
        small = await rig.watch(100, 10, processes=1, probes=10)
        large = await rig.watch(1000, 10, processes=2, probes=10)
    for fig in (direct, small, large):
        _check_viewers(fig)
    # Without the proxy every request of every viewer reaches the origin.
    assert direct["origin_rps"] >= 0.5 * direct["viewer_rps"], direct
    assert direct["origin_rps"] > ORIGIN_RPS_BOUND, direct
    assert small["origin_rps"] <= ORIGIN_RPS_BOUND, small
    assert large["origin_rps"] <= max(2 * small["origin_rps"], ORIGIN_RPS_BOUND), (small, large)
    for fig in (small, large):
        assert fig["probe_latency_p50_s"] <= 1.0, fig
        assert fig["probe_wait_p99_s"] <= 2.0, (fig["probe_wait_max_s"], fig["probe_late"],
                                                fig["probe_odd"], fig["statuses"],
                                                fig["cache"])
