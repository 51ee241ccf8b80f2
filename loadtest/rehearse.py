"""``python -m loadtest rehearse``: run one whole drop against N viewers and judge it.

The coordinator (this module) starts the target (or points at a remote one), creates
a drop as its creator, starts ``--swarm-processes`` swarm processes that connect the
viewers (spread over source addresses), then drives the drop:

    join -> countdown -> live -> BUY NOW -> rush -> sold out -> end

With ``--chat-rate R``, random viewers chat R messages a second from the countdown
through the rush (each message carries its send time; a sample of viewers times its
delivery). Meanwhile the creator drives five more drops that have no viewers through
BUY NOW and close, one request every ``--probe-interval`` seconds on an open schedule
(loadtest.creator.ControlPathProbe): the control path's latency while the workers
fan out (a request stuck behind a fan-out shows there).

Then the floor (loadtest.floor): the same swarm connects the same number of viewers
to a bare ``websockets`` broadcast server with as many processes as the server has
workers, and ``--floor-events`` messages shaped like BUY NOW are broadcast to them:
what this machine, with this load generator, needs to reach that many sockets. The
report puts BUY NOW's latency beside it, and the ratio.

It samples every swarm's progress and the server's RSS/CPU twice a second, prints a
progress line, and finally collects each swarm's raw times, audits the orders in
PostgreSQL against the stock, and writes JSON + PNG + HTML under ``loadtest-reports/``.
Every phase has a time limit and the whole run has ``--max-duration``: it always
stops by itself, and the swarms stop when the coordinator goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest import verdict
from loadtest.stats import histogram, summarize
from loadtest.swarm import SwarmConfig

__all__ = ["RehearsalConfig", "main", "rehearse"]


@dataclass
class RehearsalConfig:
    viewers: int = 1000
    stock: int = 100
    target: str = ""  # empty: start a local server
    server_workers: int = 0  # 0: one per 14,000 viewers, at least 1
    swarm_processes: int = 0  # 0: one per 14,000 viewers, at least 2
    connect_rate: float = 2000.0  # new connections per second, all swarms together
    buy_probability: float = 0.5
    buy_delay_ms: tuple[float, float] = (0.0, 200.0)
    chat_messages: int = 10  # sent during the countdown by random viewers
    chat_rate: float = 0.0  # messages/s from random viewers, countdown through rush
    probe_interval_s: float = 0.5  # creator control-path probes (0: none)
    floor: bool = True  # measure the bare-broadcast floor after the drop
    floor_events: int = 5
    floor_interval_s: float = 2.0
    server_env: dict[str, str] = field(default_factory=dict)  # extra env, local server
    encoding: str = "msgpack"
    countdown_s: float = 2.0
    rush_timeout_s: float = 30.0
    max_duration_s: float = 900.0
    p99_budget_ms: float = 1000.0
    source_addresses: list[str] = field(default_factory=list)  # empty on loopback: auto
    per_address: int = 12000  # sockets per source address (auto mode)
    jwt_secret: str = ""  # remote targets: HS256 secret to sign viewer tokens
    database_url: str = ""  # remote targets: read-only URL for the oversell audit
    out_dir: str = "loadtest-reports"
    quiet: bool = False
    command: str = ""
    fault: Any = None  # a loadtest.fault.Fault injected in the rush (--fault)

    def resolved_workers(self) -> int:
        return self.server_workers or max(1, math.ceil(self.viewers / 14000))

    def resolved_swarms(self) -> int:
        return self.swarm_processes or max(2, math.ceil(self.viewers / 14000))


def _sources(cfg: RehearsalConfig, index: int, swarms: int, count: int) -> list[str]:
    """Source addresses for swarm ``index``: explicit ones round-robin, or 127.0.0.x."""
    if cfg.source_addresses:
        return cfg.source_addresses[index::swarms] or cfg.source_addresses
    if cfg.target and not cfg.target.startswith(("http://127.", "http://localhost")):
        return []
    need = max(1, math.ceil(count / cfg.per_address))
    # 127.0.0.2, 127.0.0.3, ...: never 127.0.0.1, where the server listens.
    return [f"127.0.{k // 250}.{k % 250 + 2}"
            for k in range(index * need, (index + 1) * need)]


class _Progress:
    """Latest progress line of every swarm, and the timeline of their sum."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.events: dict[int, asyncio.Event] = {}

    def total(self, key: str) -> int:
        return sum(int(p.get(key, 0)) for p in self.latest.values())


@dataclass
class _SwarmProc:
    index: int
    proc: asyncio.subprocess.Process
    config: SwarmConfig
    reader: asyncio.Task | None = None

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            await self.proc.stdin.drain()


async def _read_swarm(sp: _SwarmProc, progress: _Progress) -> None:
    assert sp.proc.stdout is not None
    while True:
        line = await sp.proc.stdout.readline()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        kind = msg.get("type")
        if kind == "progress":
            progress.latest[sp.index] = msg
        elif kind == "report":
            progress.reports[sp.index] = msg
            progress.events[sp.index].set()


def _die_with_parent() -> None:
    from loadtest.target import die_with_parent

    die_with_parent(signal.SIGKILL)()


class Rehearsal:
    def __init__(self, cfg: RehearsalConfig) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg.max_duration_s
        self.progress = _Progress()
        self.timeline: list[dict[str, Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.swarms: list[_SwarmProc] = []
        self.watch = None
        self._last_sample = None
        self._cpu_samples: list[float] = []
        self.notes: list[str] = []

    # -- helpers ----------------------------------------------------------------------------
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def phase(self, name: str) -> None:
        self.phases.append({"name": name, "t": self.now()})
        self.say(f"phase: {name}")

    def say(self, text: str) -> None:
        if not self.cfg.quiet:
            print(f"[{self.now():7.1f}s] {text}", file=sys.stderr, flush=True)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def wait_for(self, what: str, predicate, limit_s: float, note: bool = True) -> bool:
        """Sample and print progress until ``predicate()`` or the phase/run deadline."""
        end = time.monotonic() + min(limit_s, self.remaining())
        last_print = 0.0
        while True:
            self.sample()
            if predicate():
                return True
            if time.monotonic() >= end:
                if note:
                    self.notes.append(f"timed out waiting for {what}")
                    self.say(f"timed out waiting for {what}")
                return False
            if time.monotonic() - last_print >= 1.0:
                last_print = time.monotonic()
                self.say(self.status_line())
            await asyncio.sleep(0.25)

    def status_line(self) -> str:
        p = self.progress
        row = self.timeline[-1] if self.timeline else {}
        cpu = row.get("cpu_percent")
        rss = row.get("server_rss_mib")
        # sockets: TCP connections the swarms hold (handshaking, or open and waiting
        # for their join answer, or joined); far above "joined" means joins queue.
        return (f"sockets {p.total('sockets'):>7,}  "
                f"joined {p.total('ever_joined'):>7,}/{self.cfg.viewers:,}  "
                f"open {p.total('joined'):>7,}  closed {p.total('closed'):>5,}  "
                f"BUY NOW {p.total('buy_now'):>7,}  buys {p.total('buys_sent'):>6,}  "
                f"held {p.total('buy_held'):>5,}  sold out {p.total('buy_sold_out'):>6,}  "
                + (f"server {rss:,.0f} MiB {cpu:.0f}% CPU" if rss is not None and cpu is not None
                   else ""))

    def sample(self) -> None:
        from loadtest.procstat import cpu_percent

        t = self.now()
        if self.timeline and t - self.timeline[-1]["t"] < 0.45:
            return
        row: dict[str, Any] = {"t": t, "joined": self.progress.total("joined"),
                               "buy_now": self.progress.total("buy_now"),
                               "held": self.progress.total("buy_held")}
        if self.watch is not None:
            s = self.watch.sample()
            row["server_rss_mib"] = round(s.rss_bytes / 2**20, 1)
            if self._last_sample is not None:
                row["cpu_percent"] = cpu_percent(self._last_sample, s)
                if row["cpu_percent"] is not None:
                    self._cpu_samples.append(row["cpu_percent"])
            self._last_sample = s
        self.timeline.append(row)

    # -- swarms -------------------------------------------------------------------------------
    async def start_swarms(self, ws_url: str, drop_id: int, jwt_secret: str,
                           mode: str = "drop") -> None:
        cfg = self.cfg
        n = cfg.resolved_swarms()
        base, extra = divmod(cfg.viewers, n)
        first = 0
        for i in range(n):
            count = base + (1 if i < extra else 0)
            scfg = SwarmConfig(
                ws_url=ws_url, drop_id=drop_id, first=first, count=count,
                sources=_sources(cfg, i, n, count), rate=cfg.connect_rate / n,
                buy_probability=cfg.buy_probability, buy_delay_ms=cfg.buy_delay_ms,
                encoding=cfg.encoding, jwt_secret=jwt_secret, seed=1000 + i,
                deadline_s=self.remaining() + 30, user_prefix="lt",
                chat_sample=max(1, cfg.viewers // 500), mode=mode,
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest", "swarm",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent, limit=64 << 20,
            )
            sp = _SwarmProc(i, proc, scfg)
            self.progress.events[i] = asyncio.Event()
            sp.reader = asyncio.create_task(_read_swarm(sp, self.progress))
            assert proc.stdin is not None
            proc.stdin.write((scfg.to_json() + "\n").encode())
            await proc.stdin.drain()
            self.swarms.append(sp)
            first += count

    async def collect(self) -> list[dict[str, Any]]:
        for sp in self.swarms:
            self.progress.events[sp.index].clear()
            await sp.send({"cmd": "report"})
        for sp in self.swarms:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.progress.events[sp.index].wait()
        return [self.progress.reports[i] for i in sorted(self.progress.reports)]

    async def stop_swarms(self) -> None:
        for sp in self.swarms:
            await sp.send({"cmd": "stop"})
        for sp in self.swarms:
            try:
                async with asyncio.timeout(15):
                    await sp.proc.wait()
            except TimeoutError:
                sp.proc.kill()
                await sp.proc.wait()
            if sp.reader is not None:
                sp.reader.cancel()

    # -- the drop -------------------------------------------------------------------------------
    async def run(self, target) -> dict[str, Any]:
        import httpx

        from dropserver.auth import Role, issue_token
        from loadtest.creator import ControlPathProbe, CreatorClient, CreatorError
        from loadtest.procstat import ProcWatch

        cfg = self.cfg
        settings = target.settings
        creator_token = issue_token(settings, "lt-creator", Role.CREATOR, ttl=6 * 3600,
                                    name="Rehearsal Creator")
        creator = CreatorClient(target.base_url, creator_token)
        probe = ControlPathProbe(target.base_url, creator_token)
        result: dict[str, Any] = {}
        joined = 0
        try:
            if target.server_pids:
                self.watch = ProcWatch(target.server_pids)
            self.sample()
            baseline = self.watch.sample() if self.watch else None
            await creator.create(title=f"Rehearsal {cfg.viewers} viewers", units=cfg.stock)
            drop_id = creator.drop_id
            assert drop_id is not None
            ramp_s = cfg.viewers / cfg.connect_rate
            await creator.schedule(starts_in=ramp_s + cfg.countdown_s + 30)
            self.phase("connect")
            await self.start_swarms(target.ws_url, drop_id, cfg.jwt_secret)
            t_connect = time.monotonic()
            n = len(self.swarms)
            await self.wait_for(
                "every viewer to join",
                lambda: (self.progress.total("ever_joined") >= cfg.viewers) or (
                    len(self.progress.latest) == n
                    and all(p.get("ramp_done") for p in self.progress.latest.values())
                    and self.progress.total("connecting") + self.progress.total("joining") == 0),
                limit_s=ramp_s * 3 + 120)
            connect_s = time.monotonic() - t_connect
            await asyncio.sleep(1.0)  # let the server settle before reading RSS
            self.sample()
            after_connect = self.watch.sample() if self.watch else None
            joined = self.progress.total("ever_joined")
            self.say(self.status_line())

            if cfg.probe_interval_s > 0:
                await probe.prepare()
            self.phase("countdown")
            for sp in self.swarms:
                share = cfg.chat_messages // n + (1 if sp.index < cfg.chat_messages % n else 0)
                if share:
                    await sp.send({"cmd": "chat", "count": share, "spread_s": cfg.countdown_s})
            await self.set_chat_rate(cfg.chat_rate)
            chat_started = self.progress.total("chat_sent"), time.monotonic()
            if cfg.probe_interval_s > 0:
                probe.start(cfg.probe_interval_s)
            await creator.go_live()
            await self.wait_for("countdown", lambda: False, limit_s=cfg.countdown_s,
                                note=False)

            self.phase("buy_now")
            cpu_before = self.watch.sample() if self.watch else None
            buy_now_error = None
            fault_task = (asyncio.create_task(cfg.fault.run(time.monotonic()))
                          if cfg.fault is not None else None)
            try:
                await creator.buy_now()
            except (CreatorError, httpx.HTTPError) as exc:
                # No answer in time (an overloaded server): viewers may still get BUY
                # NOW; the run goes on and the report says so.
                buy_now_error = f"{type(exc).__name__}: {exc}"[:300]
                self.notes.append(f"the creator's BUY NOW request failed: {buy_now_error}")
                self.say(self.notes[-1])
            t_buy_now = creator.calls["buy_now"]
            open_now = self.progress.total("joined")
            await self.wait_for("BUY NOW to reach every open viewer",
                                lambda: self.progress.total("buy_now") >= open_now,
                                limit_s=min(cfg.rush_timeout_s, 60))
            self.phase("rush")
            buyers = self.progress.total("buys_sent")

            def rush_over() -> bool:
                p = self.progress
                replied = (p.total("buy_held") + p.total("buy_sold_out")
                           + p.total("buy_rejected") + p.total("buy_no_reply"))
                return replied >= p.total("buys_sent") and p.total("buys_sent") >= buyers
            await asyncio.sleep(cfg.buy_delay_ms[1] / 1000.0 + 0.3)
            await self.wait_for("every buy to be answered", rush_over,
                                limit_s=cfg.rush_timeout_s)
            fault_record = await self.after_fault(fault_task) if fault_task else None
            cpu_after = self.watch.sample() if self.watch else None
            await self.set_chat_rate(0)
            chat_window = (self.progress.total("chat_sent") - chat_started[0],
                           time.monotonic() - chat_started[1])
            await probe.stop()
            held = self.progress.total("buy_held")
            if held >= cfg.stock:
                await self.wait_for("sold out to reach every open viewer",
                                    lambda: self.progress.total("sold_out_seen")
                                    >= self.progress.total("joined"), limit_s=15)
            self.phase("end")
            drop_state = (await creator.get()).get("state")
            with contextlib.suppress(Exception):
                await creator.end()
            await self.wait_for("the end to reach every open viewer",
                                lambda: self.progress.total("ended_seen")
                                >= self.progress.total("joined"), limit_s=15)
            self.phase("collect")
            reports = await self.collect()
            audit = await _audit(target.database_url, drop_id, creator.product_ids, reports,
                                 target)
            result = self.compose(reports, audit, t_buy_now=t_buy_now, joined=joined,
                                  connect_s=connect_s, baseline=baseline,
                                  after_connect=after_connect, cpu_window=(cpu_before,
                                                                           cpu_after))
            result["drop"] = {"id": drop_id, "state_before_end": drop_state,
                              "product_ids": creator.product_ids,
                              "creator_calls_ms": creator.durations_ms}
            result["creator"] = {
                "buy_now_ms": creator.durations_ms.get("buy_now"),
                "buy_now_error": buy_now_error,
                "go_live_ms": creator.durations_ms.get("live"),
                "end_ms": creator.durations_ms.get("end"),
                "probe_interval_s": cfg.probe_interval_s,
                "probes": summarize(probe.latencies), "probe_errors": probe.errors,
                "probes_due": probe.due, "probes_started": probe.started}
            result["chat"]["sent_per_s"] = (round(chat_window[0] / chat_window[1], 1)
                                            if chat_window[1] > 0 else None)
            if fault_record is not None:
                from loadtest.fault import judge, recovery

                result["fault"] = recovery(reports, fault_record, cfg.fault.budget_s, self.t0)
                result["failures"] += judge(result["fault"])
                result["passed"] = not result["failures"]
        finally:
            await creator.aclose()
            await probe.aclose()
            await self.stop_swarms()
        if cfg.floor:
            result["floor"] = await self.measure_floor(target, joined)
            verdict.compare_floor(result)
        return result

    async def after_fault(self, task: asyncio.Task) -> dict[str, Any]:
        """The fault has run (or runs now); wait until every viewer it cost a socket
        is joined again, judged on swarm progress sent after the fault."""
        record = await task
        self.say(f"fault `{record['what']}` at {record['at'] - self.t0:.1f}s: exit "
                 f"{record['exit']} {record['output'].strip()[-200:]}")
        # Judged on progress lines sent after the fault was over (a drain is over when
        # its node has exited: every socket it closes is closed), with time to see it.
        after = max(record["at"], record.get("done", record["at"])) + 0.6

        def everyone_back() -> bool:
            latest = self.progress.latest.values()
            return (len(latest) == len(self.swarms) and all(p["t"] > after for p in latest)
                    and self.progress.total("down") == 0)
        await self.wait_for("every viewer lost to the fault to be back", everyone_back,
                            limit_s=self.cfg.fault.budget_s * 3 + 30)
        return record

    async def set_chat_rate(self, rate: float) -> None:
        """Every swarm sends its share of ``rate`` chat messages a second (0 stops)."""
        if rate <= 0 and self.cfg.chat_rate <= 0:
            return
        for sp in self.swarms:
            await sp.send({"cmd": "chat_rate", "rate": rate / len(self.swarms)})

    async def measure_floor(self, target: Any, viewers: int) -> dict[str, Any]:
        """The same swarm, the same number of viewers, a bare broadcast server."""
        from dropserver.services import free_port
        from loadtest.floor import FloorServers, floor_message

        cfg = self.cfg
        redis_url = getattr(target, "redis_url", "")
        if not redis_url:
            return {"measured": False, "why": "no Redis of our own (remote target)"}
        import redis.asyncio as aioredis

        self.phase("floor")
        channel = "rehearsal:floor"
        servers = FloorServers(cfg.resolved_workers(), free_port(), redis_url, channel)
        await asyncio.to_thread(servers.start)
        redis = aioredis.Redis.from_url(redis_url)
        self.progress = _Progress()
        self.swarms = []
        sent: list[float] = []
        try:
            await self.start_swarms(servers.ws_url, 0, cfg.jwt_secret, mode="floor")
            n = len(self.swarms)
            t_connect = time.monotonic()
            await self.wait_for(
                "every floor viewer to connect",
                lambda: (self.progress.total("ever_joined") >= viewers) or (
                    len(self.progress.latest) == n
                    and all(p.get("ramp_done") for p in self.progress.latest.values())
                    and self.progress.total("connecting") == 0),
                limit_s=viewers / cfg.connect_rate * 3 + 60)
            connect_s = time.monotonic() - t_connect
            connected = self.progress.total("ever_joined")
            await asyncio.sleep(1.0)
            for k in range(cfg.floor_events):
                sent.append(time.monotonic())
                await redis.publish(channel, floor_message(k))
                await self.wait_for(f"floor message {k} to reach every viewer",
                                    lambda k=k: self.progress.total("floor_seen")
                                    >= (k + 1) * connected, limit_s=15)
                await asyncio.sleep(cfg.floor_interval_s)
            reports = await self.collect()
        finally:
            await self.stop_swarms()
            await redis.aclose()
            await asyncio.to_thread(servers.stop)
        lat: list[float] = []
        for r in reports:
            for k, times in r.get("floor_arrivals", {}).items():
                lat.extend(t - sent[int(k)] for t in times)
        expected = connected * len(sent)
        return {"measured": True, "processes": cfg.resolved_workers(),
                "viewers": connected, "connect_s": round(connect_s, 2),
                "events": len(sent), "delivered": len(lat), "expected": expected,
                "latency": summarize(lat)}

    # -- the result -------------------------------------------------------------------------------
    def compose(self, reports: list[dict[str, Any]], audit: dict[str, Any], *,
                t_buy_now: float, joined: int, connect_s: float, baseline, after_connect,
                cpu_window) -> dict[str, Any]:
        from loadtest.procstat import cpu_percent

        cfg = self.cfg
        buy_now_lat = [t - t_buy_now for r in reports for t in r["buy_now_at"]]
        reservations = [x for r in reports for x in r["reservation_s"]]
        connect_lat = [x for r in reports for x in r["connect_s"]]
        joined_at = sorted(t for r in reports for t in r["joined_at"])
        totals: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        connect_errors: Counter[str] = Counter()
        close_reasons: Counter[str] = Counter()
        last_positions: Counter[str] = Counter()
        for r in reports:
            totals.update(r["totals"])
            outcomes.update(r["buy_outcomes"])
            codes.update(r["buy_codes"])
            errors.update(r["errors"])
            connect_errors.update(r["connect_errors"])
            close_reasons.update(r["close_reasons"])
            last_positions.update(r["last_positions"])
        # The missing tail: a viewer whose last position is behind the newest one seen
        # by anyone missed the events in between (same epoch), or the whole epoch.
        tail_lost = 0
        newest: tuple[str, int] | None = None
        parsed = []
        for key, count in last_positions.items():
            epoch, _, off = key.rpartition(":")
            parsed.append((epoch, int(off), count))
            if newest is None or int(off) > newest[1]:
                newest = (epoch, int(off))
        for epoch, off, count in parsed:
            if newest is not None and (epoch, off) != newest:
                tail_lost += count * (newest[1] - off if epoch == newest[0] else newest[1])
        lost = totals["gaps"] + tail_lost
        # From the first socket's turn, not the first join: the seconds the first
        # sockets waited for their joins belong to the ramp.
        starts = [r["ramp_started_at"] for r in reports if r.get("ramp_started_at")]
        first = min(starts) if starts else (joined_at[0] if joined_at else 0.0)
        ramp = (joined_at[-1] - first) if joined_at else 0.0
        bn = summarize(buy_now_lat)
        chat_lat = [x for r in reports for x in r.get("chat_latency_s", ())]
        joined_n = max(totals["joined"], 1)
        server: dict[str, Any] = {"measured": self.watch is not None}
        if baseline is not None and after_connect is not None:
            delta = after_connect.rss_bytes - baseline.rss_bytes
            server.update({
                "workers": len(self.watch.pids),
                "rss_before_mib": round(baseline.rss_bytes / 2**20, 1),
                "rss_connected_mib": round(after_connect.rss_bytes / 2**20, 1),
                "rss_per_connection_kib": round(delta / max(joined, 1) / 1024, 1),
                "cpu_avg_percent": round(sum(self._cpu_samples) / len(self._cpu_samples), 1)
                if self._cpu_samples else None,
                "cpu_peak_percent": max(self._cpu_samples) if self._cpu_samples else None,
                "cpu_rush_percent": cpu_percent(*cpu_window) if all(cpu_window) else None,
            })
        result: dict[str, Any] = {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": cfg.command,
            "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "config": {"viewers": cfg.viewers, "stock": cfg.stock,
                       "server_workers": cfg.resolved_workers() if not cfg.target else None,
                       "swarm_processes": cfg.resolved_swarms(), "target": cfg.target
                       or "local", "connect_rate": cfg.connect_rate,
                       "buy_probability": cfg.buy_probability,
                       "buy_delay_ms": list(cfg.buy_delay_ms), "encoding": cfg.encoding,
                       "p99_budget_ms": cfg.p99_budget_ms, "chat_rate": cfg.chat_rate,
                       "chat_messages": cfg.chat_messages, "countdown_s": cfg.countdown_s,
                       "server_env": cfg.server_env,
                       "fault": ({"what": cfg.fault.describe(), "after_s": cfg.fault.after_s,
                                  "budget_s": cfg.fault.budget_s} if cfg.fault else None)},
            "connections": {
                "target": cfg.viewers, "joined": totals["joined"],
                "open_at_end": totals["open_at_report"], "failed": sum(connect_errors.values()),
                "connect_errors": dict(connect_errors.most_common(10)),
                "closes": dict(close_reasons.most_common(10)),
                "reconnects": totals["reconnects"],
                "ramp_seconds": round(connect_s, 2),
                "first_socket_to_last_join_s": round(ramp, 2),
                "rate_per_s": round(totals["joined"] / ramp, 1) if ramp > 0 else None,
                "asked_rate_per_s": (int(cfg.connect_rate)
                                     if float(cfg.connect_rate).is_integer()
                                     else cfg.connect_rate),
                "join_latency": summarize(connect_lat),
            },
            # late: learnt after a reconnect (history or snapshot), not live
            "buy_now": {"seen": len(buy_now_lat), "late_via_snapshot": totals["buy_now_late"],
                        "latency": bn, "histogram_bucket_ms": verdict.bucket_ms(bn),
                        "histogram_ms": histogram(buy_now_lat, verdict.bucket_ms(bn))},
            "positions": {"lost": lost, "gaps": totals["gaps"], "tail_lost": tail_lost,
                          "viewers_with_gaps": totals["viewers_with_gaps"],
                          "out_of_order": totals["out_of_order"],
                          "epoch_changes": totals["epoch_changes"],
                          "recovery_failed": totals["recovery_failed"],
                          "durable_events_received": totals["durable_events"],
                          "newest": list(newest) if newest else None},
            "reservations": {"wanted": totals["wants_to_buy"],
                             "sent": sum(outcomes.values()),
                             "held": outcomes.get("held", 0),
                             "sold_out": outcomes.get("sold_out", 0),
                             "rejected": outcomes.get("rejected", 0),
                             "no_reply": outcomes.get("no_reply", 0),
                             "codes": dict(codes), "latency": summarize(reservations)},
            "chat": {"rate_asked_per_s": cfg.chat_rate,
                     "sent": sum(int(r.get("chat_sent", 0)) for r in reports),
                     "received_per_viewer": round(totals["chat_seen"] / joined_n, 1),
                     "left_out_per_viewer": round(totals["chat_skipped"] / joined_n, 1),
                     "latency": summarize(chat_lat)},
            "protocol_errors": dict(errors),
            # [user, hold id, buyer number] of every hold a buyer was told of
            "holds": [h for r in reports for h in r.get("holds", ())],
            "audit": audit,
            "server": server,
            "timeline": self.timeline,
            "phases": self.phases,
            "notes": self.notes,
        }
        result["failures"] = verdict.judge(result, cfg)
        result["passed"] = not result["failures"]
        return result


async def _audit(database_url: str, drop_id: int, product_ids: list[int],
                 reports: list[dict[str, Any]], target) -> dict[str, Any]:
    """Orders in PostgreSQL against stock: units sold never above units offered."""
    if not database_url:
        return {"checked": False, "why": "no database URL for a remote target"}
    import asyncpg

    held_users = {u for r in reports for u in r["held_users"]}
    conn = await asyncpg.connect(database_url)
    try:
        # Holds reach PostgreSQL through the order queue: wait until it has caught up.
        deadline = time.monotonic() + 20
        while True:
            rows = await conn.fetch(
                "SELECT product_id, user_id, state, quantity, buyer_number FROM orders "
                "WHERE drop_id = $1", drop_id)
            if len(rows) >= len(held_users) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        units = await conn.fetch(
            "SELECT product_id, units FROM drop_products WHERE drop_id = $1", drop_id)
    finally:
        await conn.close()
    active = {"held", "payment_pending", "authorized", "paid"}
    unit_map = {r["product_id"]: r["units"] for r in units}
    sold: Counter[int] = Counter()
    states: Counter[str] = Counter()
    numbers: Counter[tuple[int, int]] = Counter()
    db_users: set[str] = set()
    for r in rows:
        states[r["state"]] += 1
        numbers[(r["product_id"], r["buyer_number"])] += 1
        if r["state"] in active:
            sold[r["product_id"]] += r["quantity"]
            db_users.add(r["user_id"])
    oversold = sum(max(0, sold[p] - unit_map.get(p, 0)) for p in unit_map)
    remaining: dict[str, int] = {}
    redis_url = getattr(target, "redis_url", "")
    if redis_url:
        import redis.asyncio as aioredis

        from checkout.inventory import remaining as redis_remaining

        client = aioredis.Redis.from_url(redis_url)
        try:
            remaining = {str(k): v for k, v in (await redis_remaining(client, drop_id)).items()}
        finally:
            await client.aclose()
    return {
        "checked": True, "units": sum(unit_map.values()),
        "active_orders": sum(sold.values()), "orders_by_state": dict(states),
        "oversold": oversold,
        "duplicate_buyer_numbers": sum(1 for c in numbers.values() if c > 1),
        "buyer_number_above_units": sum(1 for (p, n) in numbers if n > unit_map.get(p, 0)),
        "mismatched_users": len(held_users ^ db_users),
        "redis_remaining": remaining,
    }


async def rehearse(cfg: RehearsalConfig, target: Any = None) -> dict[str, Any]:
    """Run the rehearsal and write the reports; returns the result. ``target``: one
    already made (e.g. :class:`loadtest.target.ClusterTarget`), else from ``cfg``."""
    from loadtest.report import format_console, write_reports
    from loadtest.target import LocalTarget, RemoteTarget

    stem = datetime.now(UTC).strftime("rehearsal-%Y%m%dT%H%M%SZ") + f"-{cfg.viewers}v"
    out_dir = Path(cfg.out_dir)
    if target is None and cfg.target:
        from dropserver.settings import load_settings

        # Signs tokens only (no server): the given secret, else the dev one.
        settings = load_settings({}, dev=True, jwt_secret=cfg.jwt_secret)
        target = RemoteTarget(cfg.target, settings, database_url=cfg.database_url)
    elif target is None:
        target = LocalTarget(
            workers=cfg.resolved_workers(),
            # Every viewer buys from one of a few loopback addresses: lift the per-IP
            # limit; per-user limits and the velocity check stay on.
            env={"DROPSERVER_BUY_RATE_IP": "0",
                 "DROPSERVER_MAX_CONNECTIONS": str(max(18000, cfg.viewers)),
                 **cfg.server_env},
            log_path=out_dir / f"{stem}.server.log",
        )
    rehearsal = Rehearsal(cfg)
    rehearsal.say("starting " + (cfg.target or ("local server" if isinstance(target, LocalTarget)
                                                else type(target).__name__)))
    started = await asyncio.to_thread(target.__enter__)
    try:
        rehearsal.say(f"target ready: {started.base_url} "
                      f"({len(started.server_pids)} server processes)")
        result = await rehearsal.run(started)
    finally:
        await asyncio.to_thread(target.__exit__, None, None, None)
    result["reports"] = write_reports(result, out_dir, stem)
    if not cfg.quiet:
        print(format_console(result))
        print("reports: " + ", ".join(result["reports"].values()))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RehearsalConfig()
    p.add_argument("--viewers", type=int, default=d.viewers)
    p.add_argument("--stock", type=int, default=d.stock, help="units of the one product")
    p.add_argument("--target", default="", help="base URL of a running deployment; "
                   "default: start a local server on 127.0.0.1")
    p.add_argument("--server-workers", type=int, default=0,
                   help="local server worker processes (default: 1 per 14,000 viewers)")
    p.add_argument("--swarm-processes", type=int, default=0,
                   help="viewer processes (default: 1 per 14,000 viewers, at least 2)")
    p.add_argument("--connect-rate", type=float, default=d.connect_rate,
                   help="new connections per second, all swarm processes together")
    p.add_argument("--buy-probability", type=float, default=d.buy_probability)
    p.add_argument("--buy-delay-ms", type=float, nargs=2, default=list(d.buy_delay_ms),
                   metavar=("MIN", "MAX"), help="reaction time of a buyer, uniform")
    p.add_argument("--chat-messages", type=int, default=d.chat_messages,
                   help="chat messages sent during the countdown (a burst)")
    p.add_argument("--chat-rate", type=float, default=d.chat_rate,
                   help="chat messages per second from random viewers, from the countdown "
                   "through the rush (a chat storm)")
    p.add_argument("--probe-interval", type=float, default=d.probe_interval_s,
                   dest="probe_interval_s", help="seconds between the creator's control-"
                   "path probes (BUY NOW / close on a drop without viewers); 0: none")
    p.add_argument("--no-floor", action="store_false", dest="floor",
                   help="skip the bare-broadcast floor after the drop")
    p.add_argument("--floor-events", type=int, default=d.floor_events)
    p.add_argument("--floor-interval", type=float, default=d.floor_interval_s,
                   dest="floor_interval_s")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the local server (repeat), e.g. to run another "
                   "checkout: --server-env PYTHONPATH=/path/to/it")
    p.add_argument("--encoding", choices=["msgpack", "json"], default=d.encoding)
    p.add_argument("--countdown", type=float, default=d.countdown_s, dest="countdown_s")
    p.add_argument("--rush-timeout", type=float, default=d.rush_timeout_s,
                   dest="rush_timeout_s")
    p.add_argument("--max-duration", type=float, default=d.max_duration_s,
                   dest="max_duration_s", help="hard limit of the whole run, seconds")
    p.add_argument("--p99-budget-ms", type=float, default=d.p99_budget_ms)
    p.add_argument("--source-address", action="append", default=[], dest="source_addresses",
                   help="local address to connect from (repeat); default on loopback: "
                   "127.0.0.2, 127.0.0.3, ...")
    p.add_argument("--jwt-secret", default=os.environ.get("DROPSERVER_JWT_SECRET", ""),
                   help="remote targets: the HS256 secret viewer tokens are signed with")
    p.add_argument("--database-url", default="", help="remote targets: PostgreSQL URL "
                   "for the oversell audit (read only)")
    p.add_argument("--fault", default="", dest="fault_command", metavar="COMMAND",
                   help="shell command run in the rush, --fault-after seconds after BUY NOW "
                   "(e.g. 'python -m loadtest cluster kill node2'); the run then waits for "
                   "every viewer it cost a socket to rejoin, and reports how long they took")
    p.add_argument("--fault-after", type=float, default=0.5, dest="fault_after_s",
                   help="seconds after the creator sends BUY NOW")
    p.add_argument("--recovery-budget", type=float, default=10.0, dest="recovery_budget_s",
                   help="every viewer lost to the fault back within this many seconds")
    p.add_argument("--out", default=d.out_dir, dest="out_dir")
    p.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    fields = {f: getattr(args, f) for f in RehearsalConfig.__dataclass_fields__
              if hasattr(args, f)}
    fields["buy_delay_ms"] = tuple(fields["buy_delay_ms"])
    env = {}
    for item in getattr(args, "server_env", None) or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    fields["server_env"] = env
    fields["command"] = "python -m loadtest " + shlex.join(sys.argv[1:])
    if getattr(args, "fault_command", ""):
        from loadtest.fault import Fault

        fields["fault"] = Fault(after_s=args.fault_after_s, command=args.fault_command,
                                budget_s=args.recovery_budget_s)
    cfg = RehearsalConfig(**fields)
    result = asyncio.run(asyncio.wait_for(rehearse(cfg), cfg.max_duration_s + 120))
    return 0 if result.get("passed") else 1
