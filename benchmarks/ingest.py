"""Benchmark: what one 720p30 stream costs the server, and how late viewers see it.

    python -m benchmarks.ingest [--window 20] [--warmup 5] [--only cpu|glass]
                               [--bitrate 2500]

Run from the repository root (the publisher is ``tests/whip_publisher.py``). One
Valkey and PostgreSQL (:class:`dropserver.services.LocalServices`) for the whole run;
for each case a fresh single-process ``dropserver dev --port 0`` pointed at them (so
its PID is the server, and ``DROPSERVER_HLS_TRANSCODE`` applies from start-up), a
fresh drop and one publisher:

* ``passthrough`` / ``re-encode``: FFmpeg's WHIP muxer (``tests.whip_publisher``, a
  child process: libx264 baseline, GOP 30, Opus) at ``--size`` 30 fps, with
  ``DROPSERVER_HLS_TRANSCODE=auto`` then ``always``.

  - **server CPU**: user+sys time of the server PID (all its threads, from
    ``/proc/<pid>/stat``) over ``--window`` seconds that start ``--warmup`` seconds
    after the first part appeared, as % of one core, while the client below watches;
    then over a second window of the same stream with nobody watching (**ingest
    only**: WebRTC receive and packaging). Redis, PostgreSQL and the publisher are
    other processes; the publisher's CPU is shown for scale. The publisher sends
    ``--bitrate`` kbit/s CBR (x264 ``nal-hrd=cbr``, as OBS' CBR; 2,500 by default,
    what the server asks browsers to start at); **media kbit/s** is what the
    packager wrote (video + audio) in the window.
  - **publish-to-playlist**: a client long-polls ``live.m3u8`` with blocking reload
    (``_HLS_msn``/``_HLS_part`` of the next part), fetches every new part and reads
    its video samples' decode times (``tfdt`` + ``trun``). Each sample is matched to
    the publisher's frame index, whose send time (``time.monotonic()`` after the
    muxer wrote it to the socket) the publisher records. Per part: the moment the
    playlist response listing it arrived minus the send time of its **newest** frame
    (what a viewer at the live edge waits beyond the part's own length) and of its
    **oldest** frame (plus the part duration).

* ``glass``: headless Chromium (``/usr/bin/chromium``, one browser, two pages, so one
  clock). Page 1 draws ``performance.timeOrigin + performance.now()`` as a barcode
  (42-bit milliseconds + 6-bit check, each bit a white/black block over its
  complement) on a ``--size`` canvas at every animation frame, and publishes
  ``canvas.captureStream(30)`` with ``web/js/whip.js``. Page 2 plays ``live.m3u8``
  with ``web/js/player.js`` (hls.js, the viewer page's own config); at every
  animation frame it draws the video's barcode strip to a small canvas, decodes it
  and records now - encoded time: the age of the picture on screen. Also: the age
  when each picture is first seen, and how much media hls.js holds ahead of the
  playhead (``buffered.end - currentTime``). Server CPU for this browser stream too.

Prints a table per case (p50/p95/max in ms). Bounded: every case stops by itself;
the publisher, browser and servers are ended on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks._stream import (
    FPS,
    Watcher,
    create_drop,
    frame_latencies,
    media_bytes,
    start_server,
    stream_size,
)
from benchmarks._support import cpu_seconds, pcts
from dropserver.services import LocalServices

CHROMIUM = os.environ.get("DROPSERVER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required",
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 "--disable-backgrounding-occluded-windows"]


# ------------------------------------------------------------------ FFmpeg cases
@dataclass
class CpuResult:
    case: str
    size: tuple[int, int]
    kbps: float  # media written (video + audio) over the window
    server_cpu: float  # % of one core, one LL-HLS client watching
    ingest_cpu: float  # % of one core, the same stream with nobody watching
    publisher_cpu: float
    fps: float
    reloads: float  # playlist responses per second to the blocking-reload client
    newest: dict[str, float]
    oldest: dict[str, float]
    load: float


async def ffmpeg_case(services: LocalServices, media: Path, case: str, width: int,
                      height: int, warmup: float, window: float, bitrate: int) -> CpuResult:
    from tests.whip_publisher import WhipPublisher

    transcode = "always" if case == "re-encode" else "auto"
    server = start_server(services, media, transcode)
    stamps = Path(tempfile.mkdtemp(prefix="bench-ingest-")) / "sent.txt"
    publisher = None
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            drop_id = await create_drop(http, server.token)
            watcher = Watcher(http, drop_id)
            watch = asyncio.create_task(watcher.run())
            publisher = WhipPublisher(f"{server.base_url}/v1/drops/{drop_id}/whip", server.token,
                                      seconds=warmup + 2 * window + 6, profile="baseline",
                                      width=width, height=height, timestamps=str(stamps),
                                      bitrate=bitrate)
            publisher.start()
            assert publisher.proc is not None
            deadline = time.monotonic() + 30
            while not watcher.parts:
                if time.monotonic() > deadline or publisher.proc.poll() is not None:
                    raise RuntimeError(f"{case}: no part in 30 s")
                await asyncio.sleep(0.05)
            await asyncio.sleep(warmup)
            t0, s0, p0 = time.monotonic(), cpu_seconds(server.pid), cpu_seconds(
                publisher.proc.pid)
            b0 = media_bytes(media, drop_id)
            await asyncio.sleep(window)
            t1, s1, p1 = time.monotonic(), cpu_seconds(server.pid), cpu_seconds(
                publisher.proc.pid)
            b1 = media_bytes(media, drop_id)
            load = os.getloadavg()[0]
            # the same stream, nobody watching: what ingest and packaging alone cost
            watcher.stop = True
            watch.cancel()
            await asyncio.sleep(1)
            t2, s2 = time.monotonic(), cpu_seconds(server.pid)
            await asyncio.sleep(window)
            t3, s3 = time.monotonic(), cpu_seconds(server.pid)
            await publisher.wait(warmup + 2 * window + 30)
            if publisher.error:
                raise RuntimeError(publisher.error)
            sent = [float(line.split()[1]) for line in stamps.read_text().splitlines()]
            rows, _ = frame_latencies(watcher.parts, sent)
            in_window = [r for r in rows if t0 <= r[0] < t1]
            frames = sum(len(p.samples) for p in watcher.parts if t0 <= p.seen < t1)
            return CpuResult(case, watcher.size, 8 * (b1 - b0) / (t1 - t0) / 1000,
                             100 * (s1 - s0) / (t1 - t0), 100 * (s3 - s2) / (t3 - t2),
                             100 * (p1 - p0) / (t1 - t0), frames / (t1 - t0),
                             sum(1 for t in watcher.requests if t0 <= t < t1) / (t1 - t0),
                             pcts([1000 * r[1] for r in in_window]),
                             pcts([1000 * r[2] for r in in_window]), load)
    finally:
        if publisher is not None:
            publisher.kill()
        server.stop()


# ---------------------------------------------------------------- glass to viewer
_BARCODE = """
const COLS = 24, DATA_BITS = 42, CHECK_BITS = 6, CHECK_MOD = 61;
// rows: data 0..23, complement, data 24..47, complement; in the top 4/9 of the picture
function bitsOf(v) {
  const bits = [];
  for (let i = 0; i < DATA_BITS; i++) bits.push(Math.floor(v / 2 ** i) % 2);
  const check = v % CHECK_MOD;
  for (let i = 0; i < CHECK_BITS; i++) bits.push((check >> i) & 1);
  return bits;
}
"""

PUBLISH_PAGE = """<!doctype html><meta charset="utf-8"><body style="margin:0">
<script type="module">
import { WhipPublisher } from "/static/js/whip.js";
%(barcode)s
const W = %(width)d, H = %(height)d;
const canvas = document.createElement("canvas");
canvas.width = W; canvas.height = H;
document.body.append(canvas);
const g = canvas.getContext("2d");
const bw = W / COLS, bh = H / 9;
window.__draws = 0;
function draw() {
  const v = Math.floor(performance.timeOrigin + performance.now());
  g.fillStyle = "#404040"; g.fillRect(0, 0, W, H);
  const x = (v / 4) %% W;  // something moving under the code, like a real picture
  g.fillStyle = "#c08040"; g.fillRect(x, H * 0.55, W / 8, H / 3);
  const bits = bitsOf(v);
  for (let k = 0; k < bits.length; k++) {
    const row = Math.floor(k / COLS) * 2, col = k %% COLS;
    g.fillStyle = bits[k] ? "#fff" : "#000";
    g.fillRect(col * bw, row * bh, bw, bh);
    g.fillStyle = bits[k] ? "#000" : "#fff";
    g.fillRect(col * bw, (row + 1) * bh, bw, bh);
  }
  window.__draws++;
  requestAnimationFrame(draw);
}
draw();
const stream = canvas.captureStream(%(fps)d);
// a quiet tone as the microphone: a creator's stream has audio (and the viewer's
// MediaSource waits for the audio track the init segment declares)
const ac = new AudioContext();
const osc = ac.createOscillator(), gain = ac.createGain();
gain.gain.value = 0.05;
const dest = ac.createMediaStreamDestination();
osc.connect(gain).connect(dest);
osc.start();
stream.addTrack(dest.stream.getAudioTracks()[0]);
const pub = new WhipPublisher("%(whip)s", "%(token)s");
pub.addEventListener("state", (e) => { window.__state = e.detail.state; });
pub.start(stream).then(() => { window.__started = true; },
                       (e) => { window.__error = String(e); });
window.__pub = pub;
</script>"""

VIEW_PAGE = """<!doctype html><meta charset="utf-8"><body style="margin:0">
<script type="module">
import { startPlayer } from "/static/js/player.js";
%(barcode)s
const video = document.createElement("video");
video.muted = true; video.playsInline = true; video.autoplay = true;
document.body.append(video);
window.__player = startPlayer(video, "%(hls)s", {
  onStalled: (d) => console.warn(`player: ${d?.type} ${d?.details} ${d?.reason || ""}`) });
const SW = COLS * 8, SH = 4 * 8;  // the barcode strip scaled to 8x8 px per block
const c = document.createElement("canvas"); c.width = SW; c.height = SH;
const g = c.getContext("2d", { willReadFrequently: true });
window.__samples = [];  // [now, encoded ms, buffered ahead s]
window.__bad = 0;
function lum(d, x, y) { const i = (y * SW + x) * 4; return d[i] + d[i + 1] + d[i + 2]; }
function decode() {
  const h = video.videoHeight, w = video.videoWidth;
  g.drawImage(video, 0, 0, w, h * 4 / 9, 0, 0, SW, SH);
  const d = g.getImageData(0, 0, SW, SH).data;
  let v = 0, check = 0;
  for (let k = 0; k < DATA_BITS + CHECK_BITS; k++) {
    const row = Math.floor(k / COLS) * 2, col = k %% COLS;
    const a = lum(d, col * 8 + 4, row * 8 + 4), b = lum(d, col * 8 + 4, (row + 1) * 8 + 4);
    if (Math.abs(a - b) < 150) return null;
    const bit = a > b ? 1 : 0;
    if (k < DATA_BITS) v += bit * 2 ** k; else check |= bit << (k - DATA_BITS);
  }
  return check === v %% CHECK_MOD ? v : null;
}
function tick() {
  if (video.readyState >= 2 && video.videoWidth > 0) {
    const v = decode();
    const now = performance.timeOrigin + performance.now();
    const b = video.buffered;
    const ahead = b.length ? b.end(b.length - 1) - video.currentTime : 0;
    if (v !== null && now - v >= 0 && now - v < 60000) window.__samples.push([now, v, ahead]);
    else window.__bad++;
  }
  requestAnimationFrame(tick);
}
requestAnimationFrame(tick);
</script>"""


def _serve(html: str):
    async def handler(route, _request) -> None:
        await route.fulfill(body=html, content_type="text/html")
    return handler


@dataclass
class GlassResult:
    size: tuple[int, int]
    kbps: float  # media written (video + audio) over the window
    age: dict[str, float]  # every rAF sample: age of the picture on screen
    first_seen: dict[str, float]  # each picture the first time it is on screen
    ahead: float  # median seconds buffered ahead of the playhead
    server_cpu: float
    bad: int
    draws_per_s: float
    pictures_per_s: float
    load: float


async def glass_case(services: LocalServices, media: Path, width: int, height: int,
                     warmup: float, window: float) -> GlassResult:
    from playwright.async_api import async_playwright

    server = start_server(services, media, "auto")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http, \
                async_playwright() as pw:
            drop_id = await create_drop(http, server.token)
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=CHROMIUM_ARGS)
            try:
                logs: list[str] = []
                pages = {}
                for name, html in (
                        ("publish", PUBLISH_PAGE % {
                            "barcode": _BARCODE, "width": width, "height": height,
                            "fps": FPS, "token": server.token,
                            "whip": f"{server.base_url}/v1/drops/{drop_id}/whip"}),
                        ("view", VIEW_PAGE % {
                            "barcode": _BARCODE,
                            "hls": f"{server.base_url}/v1/drops/{drop_id}/hls/live.m3u8"})):
                    # a context (window) each: a background tab would not play
                    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
                    page = await ctx.new_page()
                    page.on("console", lambda m, n=name: logs.append(f"{n}: {m.text}"))
                    page.on("pageerror", lambda e, n=name: logs.append(f"{n} error: {e}"))
                    url = f"{server.base_url}/__bench/{name}.html"
                    await page.route(url, _serve(html))
                    pages[name] = page
                await pages["publish"].goto(f"{server.base_url}/__bench/publish.html")
                await pages["publish"].wait_for_function(
                    "() => window.__started || window.__error", timeout=30_000)
                error = await pages["publish"].evaluate("window.__error")
                if error:
                    raise RuntimeError(f"WHIP publish failed: {error}")
                deadline = time.monotonic() + 30
                while (await http.get(f"/v1/drops/{drop_id}/hls/live.m3u8")).status_code != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no playlist 30 s after the WHIP publish")
                    await asyncio.sleep(0.1)
                await pages["view"].goto(f"{server.base_url}/__bench/view.html")
                try:
                    await pages["view"].wait_for_function(
                        "() => window.__samples.length > 0", timeout=30_000)
                except Exception as exc:
                    state = await pages["view"].evaluate(
                        "(() => { const v = document.querySelector('video'); return "
                        "{ready: v.readyState, w: v.videoWidth, t: v.currentTime, "
                        "bad: window.__bad, buf: Array.from({length: v.buffered.length}, (_, i) => "
                        "[v.buffered.start(i), v.buffered.end(i)]), paused: v.paused}; })()")
                    pl = (await http.get(f"/v1/drops/{drop_id}/hls/live.m3u8")).text
                    logs.append(pl[-600:])
                    raise RuntimeError(f"the viewer decoded no barcode ({state}):\n"
                                       + "\n".join(logs[-20:])) from exc
                await asyncio.sleep(warmup)
                await pages["view"].evaluate("window.__samples = []; window.__bad = 0")
                d0 = await pages["publish"].evaluate("window.__draws")
                t0, s0 = time.monotonic(), cpu_seconds(server.pid)
                b0 = media_bytes(media, drop_id)
                await asyncio.sleep(window)
                t1, s1 = time.monotonic(), cpu_seconds(server.pid)
                b1 = media_bytes(media, drop_id)
                load = os.getloadavg()[0]
                d1 = await pages["publish"].evaluate("window.__draws")
                samples = await pages["view"].evaluate("window.__samples")
                bad = await pages["view"].evaluate("window.__bad")
                size = await stream_size(http, drop_id)
                await pages["publish"].evaluate("window.__pub.stop()")
            finally:
                await browser.close()
    finally:
        server.stop()
    ages = [now - v for now, v, _ in samples]
    first: dict[int, float] = {}
    for now, v, _ in samples:
        first.setdefault(v, now - v)
    return GlassResult(size, 8 * (b1 - b0) / (t1 - t0) / 1000, pcts(ages),
                       pcts(list(first.values())),
                       statistics.median([a for _, _, a in samples]) if samples else 0.0,
                       100 * (s1 - s0) / (t1 - t0), bad, (d1 - d0) / (t1 - t0),
                       len(first) / (t1 - t0), load)


# -------------------------------------------------------------------------- main
def _fmt(stats: dict[str, float]) -> str:
    return " | ".join(f"{stats[k]:.0f}" for k in ("p50", "p95", "max"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--only", choices=("cpu", "glass"), default=None)
    parser.add_argument("--bitrate", type=int, default=2500,
                        help="FFmpeg publisher's video bitrate, kbit/s CBR (0: x264 decides)")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    if not Path("tests/whip_publisher.py").exists():
        sys.exit("run from the repository root (the publisher is tests/whip_publisher.py)")
    cpu: list[CpuResult] = []
    glass: GlassResult | None = None
    with LocalServices() as services, tempfile.TemporaryDirectory(
            prefix="bench-ingest-media-") as media:
        if args.only in (None, "cpu"):
            for case in ("passthrough", "re-encode"):
                cpu.append(asyncio.run(ffmpeg_case(services, Path(media) / case, case,
                                                   width, height, args.warmup, args.window,
                                                   args.bitrate)))
        if args.only in (None, "glass"):
            glass = asyncio.run(glass_case(services, Path(media) / "glass", width, height,
                                           args.warmup, args.window))
    if cpu:
        print(f"\nFFmpeg WHIP publisher, {args.size} {FPS} fps, window {args.window:.0f} s "
              f"after {args.warmup:.0f} s warm-up")
        print("| case | stream | media kbit/s | server CPU, ingest only | server CPU, + 1 "
              "LL-HLS viewer | publisher CPU "
              "| fps in playlist | playlist reloads/s "
              "| newest frame -> listed p50 / p95 / max (ms) "
              "| oldest frame -> listed p50 / p95 / max (ms) | load avg |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in cpu:
            print(f"| {r.case} | {r.size[0]}x{r.size[1]} | {r.kbps:,.0f} | {r.ingest_cpu:.1f}% | "
                  f"{r.server_cpu:.1f}% | "
                  f"{r.publisher_cpu:.0f}% | {r.fps:.1f} | {r.reloads:.1f} | {_fmt(r.newest)} | "
                  f"{_fmt(r.oldest)} | {r.load:.2f} |")
    if glass is not None:
        print(f"\nChromium canvas -> WHIP -> passthrough -> LL-HLS -> hls.js, {args.size}, "
              f"window {args.window:.0f} s after {args.warmup:.0f} s warm-up")
        print("| measure | p50 (ms) | p95 (ms) | max (ms) | samples |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| glass-to-viewer, picture on screen at each rAF | {_fmt(glass.age)} | "
              f"{glass.age['n']} |")
        print(f"| glass-to-viewer, picture first on screen | {_fmt(glass.first_seen)} | "
              f"{glass.first_seen['n']} |")
        print(f"\nstream {glass.size[0]}x{glass.size[1]}, {glass.kbps:,.0f} kbit/s; server CPU "
              f"{glass.server_cpu:.1f}% of one core; hls.js buffered ahead of the playhead "
              f"(median) {1000 * glass.ahead:.0f} ms; canvas draws {glass.draws_per_s:.1f}/s; "
              f"distinct pictures shown {glass.pictures_per_s:.1f}/s; undecodable rAF "
              f"samples {glass.bad}; load avg {glass.load:.2f}")


if __name__ == "__main__":
    main()
