"""Benchmark: what the load generator spends to read what it receives.

The rehearsal's viewers run in swarm processes on the same cores as the server they
measure, so every microsecond a swarm spends reading a frame is taken from the server
(docs/benchmarks.md, "Chat storm"). This isolates that cost: one real swarm process
(``python -m loadtest swarm``, the rehearsal's own, from the checkout named by
``--generator``) connects ``--sockets`` viewers to a local sender (a bare
``websockets`` server in this process) that answers each join, then writes
``--batches`` chat batches to every socket, ``--interval`` seconds apart, each shaped
like a big room's batch in a storm (``--kept`` chat messages out of ``--per-batch``,
then a ``skipped`` frame: docs/protocol.md), then ``drop.ended``. The swarm
process's CPU (user + system, from /proc) is read when the first batch leaves and
when every viewer has seen ``drop.ended``; the swarm's report then says whether every
viewer accounted every position (no gap, nothing out of order: the command exits 1
otherwise).

Printed per run and generator: CPU per frame and per chat message received (us),
messages read per CPU second, and the checks. With several ``--generator`` the runs
alternate between them (A, B, A, B, ...), each with a fresh swarm and sender.

    python -m benchmarks.swarm_recv                      # this checkout's generator
    python -m benchmarks.swarm_recv --generator /path/to/old --generator . --runs 3

Figures go to docs/benchmarks.md ("The load generator's reading cost").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
from websockets.exceptions import ConnectionClosed

__all__ = ["batch_frames", "main"]

EPOCH = "bench"


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (from /proc, so any process of ours)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_frames(b: int, kept: int, per_batch: int, sent_at: float) -> list[dict[str, Any]]:
    """Batch ``b`` of a big room's chat: ``kept`` chat events spread over the
    ``per_batch`` offsets it covers, then ``skipped`` up to its last offset."""
    base = b * per_batch
    step = max(1, per_batch // kept)
    frames: list[dict[str, Any]] = []
    for k in range(kept):
        offset = base + 1 + k * step
        text = f"rc {sent_at:.6f} bench/{offset}"  # loadtest.viewer.chat_text's shape
        frames.append({"t": "event", "event": "chat.message",
                       "data": {"id": f"{offset:016x}", "user_id": f"lt-{offset % 9973}",
                                "name": f"lt-{offset % 9973}", "text": text,
                                "at": int(time.time() * 1000)},
                       "pos": {"epoch": EPOCH, "offset": offset}})
    left_out = per_batch - kept
    if left_out:
        frames.append({"t": "skipped", "count": left_out,
                       "pos": {"epoch": EPOCH, "offset": base + per_batch}})
    return frames


class _Sender:
    """A bare ``websockets`` server that answers joins and broadcasts what it is told."""

    def __init__(self) -> None:
        self.conns: set[Any] = set()
        self.joined = 0

    async def handler(self, ws: Any) -> None:
        self.conns.add(ws)
        try:
            async for raw in ws:
                frame = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                if frame.get("t") == "join":
                    await ws.send(msgpack.packb({
                        "t": "joined", "id": str(frame.get("id")), "drop_id": 1,
                        "recovered": False, "pos": {"epoch": EPOCH, "offset": 0},
                        "snapshot": {"state": "live"}}))
                    self.joined += 1
        except ConnectionClosed:  # the swarm is stopping
            pass
        finally:
            self.conns.discard(ws)


async def _read_lines(proc: asyncio.subprocess.Process, latest: dict[str, Any],
                      report: asyncio.Future) -> None:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            return
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if msg.get("type") == "progress":
                latest.update(msg)
            elif msg.get("type") == "report" and not report.done():
                report.set_result(msg)


async def _wait(what: str, cond: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def one_run(generator: str, sockets: int, batches: int, kept: int, per_batch: int,
                  interval: float, profile: str | None = None) -> dict[str, Any]:
    from websockets.asyncio.server import broadcast, serve

    sender = _Sender()
    async with serve(sender.handler, "127.0.0.1", 0, compression=None, ping_interval=None,
                     backlog=4096, subprotocols=["dropserver.msgpack.v1"], max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        env = {**os.environ, "PYTHONPATH": generator}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest", "swarm", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, cwd="/", limit=64 << 20)
        latest: dict[str, Any] = {}
        report: asyncio.Future = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(_read_lines(proc, latest, report))
        config = {"ws_url": f"ws://127.0.0.1:{port}/", "drop_id": 1, "first": 0,
                  "count": sockets, "rate": 4000.0, "buy_probability": 0.0,
                  "deadline_s": 600.0, "progress_interval": 0.5, "reconnect": False,
                  "chat_sample": 20}  # the rehearsal's sample at 10,000 viewers
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(config) + "\n").encode())
        await proc.stdin.drain()
        try:
            await _wait("every viewer to join", lambda: sender.joined >= sockets
                        and latest.get("joined", 0) >= sockets, 120)
            await asyncio.sleep(0.5)
            spy = None
            if profile:
                spy = await asyncio.create_subprocess_exec(
                    "py-spy", "record", "-p", str(proc.pid), "--nonblocking", "--format",
                    "raw", "-o", profile, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL)
                await asyncio.sleep(1.0)
            cpu0, t0 = _proc_cpu(proc.pid), time.monotonic()
            for b in range(batches):
                frames = batch_frames(b, kept, per_batch, time.monotonic())
                broadcast(sender.conns, msgpack.packb(frames))
                await asyncio.sleep(interval)
            ended = {"t": "event", "event": "drop.ended", "data": {"state": "ended"},
                     "pos": {"epoch": EPOCH, "offset": batches * per_batch + 1}}
            broadcast(sender.conns, msgpack.packb(ended))
            await _wait("every viewer to see the end",
                        lambda: latest.get("ended_seen", 0) >= sockets, 120)
            cpu1, t1 = _proc_cpu(proc.pid), time.monotonic()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                await spy.wait()
            proc.stdin.write(b'{"cmd": "report"}\n')
            await proc.stdin.drain()
            async with asyncio.timeout(60):
                rep = await report
        finally:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(b'{"cmd": "stop"}\n')
                await proc.stdin.drain()
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
            reader.cancel()
    cpu = cpu1 - cpu0
    frames_in = sockets * (batches + 1)
    messages = sockets * batches * kept
    totals = rep.get("totals") or {}
    checks = {k: totals.get(k) for k in ("joined", "gaps", "out_of_order", "chat_seen",
                                         "chat_skipped", "durable_events", "ended_seen")}
    checks["chat_latencies"] = len(rep.get("chat_latency_s") or ())
    checks["errors"] = rep.get("errors")
    return {"generator": generator, "sockets": sockets, "batches": batches, "kept": kept,
            "per_batch": per_batch, "cpu_s": round(cpu, 3), "wall_s": round(t1 - t0, 3),
            "us_per_frame": round(cpu / frames_in * 1e6, 2),
            "us_per_message": round(cpu / messages * 1e6, 3),
            "messages_per_cpu_s": round(messages / cpu) if cpu > 0 else None,
            "checks": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swarm_recv",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", action="append", default=None,
                        help="checkout whose loadtest runs the swarm (repeat to compare; "
                             "default: this one)")
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--kept", type=int, default=20, help="chat messages per batch")
    parser.add_argument("--per-batch", type=int, default=200,
                        help="offsets a batch covers (the rest is a skipped frame)")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=2, help="runs per generator")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the swarm through the batches (raw stacks, one file a run)")
    ns = parser.parse_args(argv)
    generators = [str(Path(g).resolve()) for g in ns.generator or [Path(__file__).parent.parent]]
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}; {ns.sockets} sockets x {ns.batches} batches of "
          f"{ns.kept} messages (+ skipped), {ns.interval} s apart", flush=True)
    results = []
    for r in range(ns.runs):
        for gen in generators:
            profile = None
            if ns.profile:
                Path(ns.profile).mkdir(parents=True, exist_ok=True)
                profile = str(Path(ns.profile) / f"swarm-{Path(gen).name}-{r + 1}.txt")
            res = asyncio.run(one_run(gen, ns.sockets, ns.batches, ns.kept, ns.per_batch,
                                      ns.interval, profile))
            res["run"] = r + 1
            results.append(res)
            print(json.dumps(res), flush=True)
    print(f"# load {os.getloadavg()[0]:.2f} at the end")
    for gen in generators:
        mine = [x["us_per_message"] for x in results if x["generator"] == gen]
        print(f"{gen}: us per message {min(mine)}-{max(mine)} "
              f"(mean {sum(mine) / len(mine):.3f}), per frame "
              f"{', '.join(str(x['us_per_frame']) for x in results if x['generator'] == gen)}")
    if len(generators) == 2:
        a = [x["us_per_message"] for x in results if x["generator"] == generators[0]]
        b = [x["us_per_message"] for x in results if x["generator"] == generators[1]]
        print(f"ratio {generators[1]} / {generators[0]}: "
              f"{(sum(b) / len(b)) / (sum(a) / len(a)):.3f}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=1))
    bad = [x for x in results if x["checks"]["gaps"] or x["checks"]["out_of_order"]
           or x["checks"]["joined"] != x["sockets"]
           or x["checks"]["ended_seen"] != x["sockets"]]
    if bad:  # a generator that reads less than every position is not cheaper, it is wrong
        print(f"FAILED checks in {len(bad)} run(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
