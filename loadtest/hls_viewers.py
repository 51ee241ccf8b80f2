"""Simulated LL-HLS viewers: thousands on one event loop, over raw HTTP/1.1 keep-alive.

Each viewer plays the live edge as an LL-HLS player does (rfc8216bis 6.2.5.2 and
6.2.6; hls.js in ``lowLatencyMode`` does the same): it loads ``live.m3u8`` once, then,
for every part, asks at the same time for the part its ``EXT-X-PRELOAD-HINT`` names
and for the playlist that will list it (``?_HLS_msn=M&_HLS_part=P``), on two
connections; both are held until the part exists. It never downloads whole segments:
at the live edge a player reads parts. Each part is timed when its last byte arrives;
``written(name)`` (given by the caller) says when the origin wrote it, so that part
latency is the time from the origin having a part to a viewer having it.

The client is a few lines of HTTP/1.1 on ``asyncio`` streams, not httpx: a thousand
viewers make ten thousand requests a second, and a general client's cost per request
would measure the client, not the proxy. One process holds only so many: the event
loop's lag is measured alongside (``loop_lag``), so a saturated client shows as such.
Several processes split a crowd::

    python -m loadtest.hls_viewers http://127.0.0.1:8080 DROP_ID VIEWERS SECONDS \
        --parts-dir MEDIA/drops/DROP_ID

prints one JSON object: the figures of :class:`ViewerStats`, latencies in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HttpConnection", "PartTimes", "ViewerStats", "hint_of", "main", "run_viewers"]

_HINT = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"')


def hint_of(playlist: str) -> tuple[int, int] | None:
    """``(msn, part)`` of the playlist's preload hint, None when it has none."""
    m = _HINT.search(playlist)
    return (int(m.group(1)), int(m.group(2))) if m else None


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, limit=1 << 20)
            try:
                return await self._request(path)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self._reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(c[:-2] for c in chunks)
        else:
            body = await self._reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass
class ViewerStats:
    """What all viewers of one run saw."""

    viewers: int = 0
    started: int = 0  # viewers that got a first playlist
    parts: int = 0
    bytes: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per part
    # seconds the proxy and origin took beyond the moment a thing existed and was asked
    # for: a part's arrival - max(asked, written), a blocking playlist reload's arrival
    # - max(asked, its part written). A viewer whose loop stalls asks late; that lag is
    # in ``latencies``, not here: these are the servers' alone.
    waits: list[float] = field(default_factory=list)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    cache: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    loop_lag: list[float] = field(default_factory=list)  # seconds late, a tick per 50 ms
    odd: list[str] = field(default_factory=list)  # the first answers other than 200
    late: list[str] = field(default_factory=list)  # the first parts over 2 s late
    # every request, when asked for (``trace=True``): (viewer, asked, answered (unix
    # seconds), path, status, X-Cache-Status); not part of to_json
    trace: list[tuple] | None = None

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in (
            "viewers", "started", "parts", "bytes", "requests", "odd", "late")}
        for name in ("statuses", "cache", "errors"):
            out[name] = dict(getattr(self, name))
        out["latencies"] = [round(x * 1000, 1) for x in self.latencies]
        out["waits"] = [round(x * 1000, 1) for x in self.waits]
        out["loop_lag"] = [round(x * 1000, 1) for x in self.loop_lag]
        return out

    def merge(self, other: dict) -> None:
        """Add another process's :meth:`to_json` to these figures."""
        for name in ("viewers", "started", "parts", "bytes", "requests"):
            setattr(self, name, getattr(self, name) + other[name])
        self.latencies += [x / 1000 for x in other["latencies"]]
        self.waits += [x / 1000 for x in other.get("waits", [])]
        self.odd += other.get("odd", [])[:20 - len(self.odd)]
        self.late += other.get("late", [])[:20 - len(self.late)]
        self.loop_lag += [x / 1000 for x in other["loop_lag"]]
        for name in ("statuses", "cache", "errors"):
            getattr(self, name).update({(int(k) if name == "statuses" else k): v
                                        for k, v in other[name].items()})


async def _viewer(host: str, port: int, base: str, until: float, stats: ViewerStats,
                  written: Callable[[str], float | None], number: int = 0) -> None:
    playlist_conn, part_conn = HttpConnection(host, port), HttpConnection(host, port)

    async def get(conn: HttpConnection, path: str) -> tuple[int, dict[str, str], bytes]:
        asked = time.time()
        status, headers, body = await conn.get(path)
        if stats.trace is not None:
            stats.trace.append((number, round(asked, 4), round(time.time(), 4), path,
                                status, headers.get("x-cache-status", "-")))
        stats.requests += 1
        stats.statuses[status] += 1
        stats.cache[headers.get("x-cache-status", "-")] += 1
        if status != 200 and len(stats.odd) < 20:
            stats.odd.append(f"{time.time():.3f} {status} {path} "
                             f"{headers.get('x-cache-status', '-')} {body[:80]!r}")
        return status, headers, body

    async def part(name: str) -> None:
        asked = time.time()
        status, headers, body = await get(part_conn, f"{base}/{name}")
        if status != 200:
            return
        arrived = time.time()
        stats.parts += 1
        stats.bytes += len(body)
        at = written(name)
        if at is not None:
            stats.latencies.append(arrived - at)
            stats.waits.append(arrived - max(asked, at))
            if arrived - at > 2 and len(stats.late) < 20:
                stats.late.append(f"{name} asked {asked - at:+.3f} s, arrived "
                                  f"{arrived - at:+.3f} s after written, "
                                  f"{headers.get('x-cache-status', '-')}")

    try:
        hint = None
        while hint is None and time.monotonic() < until:
            status, _, body = await get(playlist_conn, f"{base}/live.m3u8")
            hint = hint_of(body.decode()) if status == 200 else None
            if hint is None:
                await asyncio.sleep(0.2)
        stats.started += 1
        while hint is not None and time.monotonic() < until:
            msn, index = hint
            fetch = asyncio.ensure_future(part(f"s{msn}.{index}.m4s"))
            asked = time.time()
            status, _, body = await get(
                playlist_conn, f"{base}/live.m3u8?_HLS_msn={msn}&_HLS_part={index}")
            if status == 200:
                at = written(f"s{msn}.{index}.m4s")  # listed now, so it exists
                if at is not None:
                    stats.waits.append(time.time() - max(asked, at))
            await fetch
            text = body.decode() if status == 200 else ""
            if "#EXT-X-ENDLIST" in text:
                break
            new = hint_of(text)
            if new is None or new <= hint:
                # a 503 (the part came late), or a stale answer: start again from the
                # playlist as it is now
                await asyncio.sleep(0.05)
                status, _, body = await get(playlist_conn, f"{base}/live.m3u8")
                new = hint_of(body.decode()) if status == 200 else None
            hint = new
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        stats.errors[type(exc).__name__] += 1
    finally:
        playlist_conn.close()
        part_conn.close()


async def run_viewers(url: str, drop_id: int, viewers: int, seconds: float, *,
                      written: Callable[[str], float | None], ramp: float = 2.0,
                      trace: bool = False) -> ViewerStats:
    """``viewers`` LL-HLS viewers of ``drop_id`` at ``url`` (``http://host:port``), each
    starting within ``ramp`` seconds and all stopping ``seconds`` after the start;
    ``trace``: every request kept in ``stats.trace``."""
    m = re.fullmatch(r"http://([^:/]+):(\d+)/?", url)
    if m is None:
        raise ValueError(f"not an http://host:port URL: {url}")
    host, port = m.group(1), int(m.group(2))
    base = f"/v1/drops/{int(drop_id)}/hls"
    stats = ViewerStats(viewers=viewers, trace=[] if trace else None)
    until = time.monotonic() + seconds

    async def one(k: int) -> None:
        await asyncio.sleep(ramp * k / max(1, viewers))
        await _viewer(host, port, base, until, stats, written, k)

    async def lag() -> None:
        while True:
            at = time.monotonic()
            await asyncio.sleep(0.05)
            stats.loop_lag.append(max(0.0, time.monotonic() - at - 0.05))

    ticker = asyncio.create_task(lag())
    tasks = [asyncio.create_task(one(k)) for k in range(viewers)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
    finally:
        for t in [*tasks, ticker]:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, ticker, return_exceptions=True)
    return stats


class PartTimes:
    """When the origin wrote each part: its file's mtime (the packager writes a part
    whole and renames it into place), read once per name while the run goes on
    (parts are deleted some segments later). Same machine, same clock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: dict[str, float | None] = {}

    def __call__(self, name: str) -> float | None:
        if name not in self.seen:
            try:
                self.seen[name] = (self.directory / name).stat().st_mtime_ns / 1e9
            except OSError:
                self.seen[name] = None
        return self.seen[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hls_viewers",
                                     description="Simulated LL-HLS viewers of one drop.")
    parser.add_argument("url", help="http://host:port of the proxy (or the origin)")
    parser.add_argument("drop_id", type=int)
    parser.add_argument("viewers", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--parts-dir", required=True, type=Path,
                        help="the drop's media directory, for when each part was written")
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--trace", type=Path,
                        help="write every request here, one JSON array a line: viewer, "
                             "asked, answered (unix seconds), path, status, X-Cache-Status"
                             "; and when each part was written to its name with .parts")
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    written = PartTimes(args.parts_dir)
    stats = asyncio.run(run_viewers(args.url, args.drop_id, args.viewers, args.seconds,
                                    written=written, ramp=args.ramp,
                                    trace=args.trace is not None))
    if args.trace is not None:
        with args.trace.open("w") as out:
            out.writelines(json.dumps(row) + "\n" for row in stats.trace or [])
        with args.trace.with_suffix(".parts").open("w") as out:  # when each was written
            out.writelines(json.dumps([name, at]) + "\n"
                           for name, at in sorted(written.seen.items()))
    json.dump(stats.to_json(), sys.stdout)


if __name__ == "__main__":
    main()
