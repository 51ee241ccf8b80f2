"""``python -m loadtest rehearse``: run one whole drop against N viewers and judge it.

The coordinator (this module) starts the target (or points at a remote one), creates
a drop as its creator, starts ``--swarm-processes`` swarm processes that connect the
viewers (spread over source addresses), then drives the drop:

    join -> countdown -> live -> [giveaway] -> BUY NOW -> rush -> sold out -> end

With ``--giveaway`` every viewer enters a giveaway between going live and BUY NOW
(loadtest.giveaway: entries per second, and the draw audited from PostgreSQL).

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

With ``--chat-floor-intervals``, the chat floor (loadtest.floor): the same swarm
connects the same number of viewers to the same bare servers taking chat, and its
viewers send the same storm (``--chat-rate``) for ``--chat-floor-duration`` seconds per
batch interval, every message delivered to every viewer; the report puts the chat's
delivery latency beside the best interval's, and the ratio.

It samples every swarm's progress and the server's RSS/CPU twice a second
(loadtest.swarm_pipes), prints a progress line, and finally collects each swarm's raw
times into the result (loadtest.figures), audits the orders in PostgreSQL against the
stock and judges the run (loadtest.verdict), and writes JSON + PNG + HTML under
``loadtest-reports/`` (loadtest.report). Its command-line options are
loadtest.rehearse_cli's.
Every phase has a time limit and the whole run has ``--max-duration``: it always
stops by itself, and the swarms stop when the coordinator goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest import figures, verdict
from loadtest.stats import summarize
from loadtest.swarm import SwarmConfig
from loadtest.swarm_pipes import Progress, SwarmProc, die_with_parent, read_swarm, sources

__all__ = ["Rehearsal", "RehearsalConfig", "rehearse"]

FLOORS = ("bare", "rush", "both", "none")  # RehearsalConfig.floor
CHAT_SETTLE_S = 2.0  # chat sent as the storm stopped lands after drop.ended (<= 1.25 s)


@dataclass
class RehearsalConfig:
    viewers: int = 1000
    stock: int = 100
    variants: int = 0  # the product's variants sharing the stock (0: none)
    target: str = ""  # empty: start a local server
    server_workers: int = 0  # 0: one per 14,000 viewers, at least 1
    swarm_processes: int = 0  # 0: one per 14,000 viewers, at least 2
    connect_rate: float = 2000.0  # new connections per second, all swarms together
    buy_probability: float = 0.5
    buy_delay_ms: tuple[float, float] = (0.0, 200.0)
    chat_messages: int = 10  # sent during the countdown by random viewers
    chat_rate: float = 0.0  # messages/s from random viewers, countdown through rush
    probe_interval_s: float = 0.5  # creator control-path probes (0: none)
    # The floors measured after the drop (loadtest.floor): "bare" (the broadcast alone,
    # what issue 16 judges against), "rush" (the broadcast plus the same buy rush),
    # "both", or "none"; True/False mean "bare"/"none".
    floor: str | bool = "bare"
    floor_events: int = 5
    floor_interval_s: float = 2.0
    # The chat floor (loadtest.floor, --chat): its batch intervals in ms, each tried on
    # the same sockets for chat_floor_s seconds of the storm (0: unbatched); empty: none.
    chat_floor_intervals: tuple[int, ...] = ()
    chat_floor_s: float = 15.0
    server_env: dict[str, str] = field(default_factory=dict)  # extra env, local server
    encoding: str = "msgpack"
    countdown_s: float = 2.0
    # BUY NOW comes countdown_s plus up to this many seconds (uniform) after go-live:
    # not on the beat of a big room's chat batches (docs/benchmarks.md, "Chat storm").
    countdown_jitter_s: float = 0.0
    countdown_drawn_s: float | None = None  # the countdown of this run, once drawn
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
    # The giveaway scenario (loadtest.giveaway), between going live and BUY NOW.
    giveaway: bool = False
    giveaway_window_s: float = 10.0
    giveaway_winners: int = 3
    enter_probability: float = 1.0

    def __post_init__(self) -> None:
        if self.floor is True or self.floor is False:
            self.floor = "bare" if self.floor else "none"
        if self.floor not in FLOORS:
            raise ValueError(f"floor must be one of {', '.join(FLOORS)}, not {self.floor!r}")
        self.chat_floor_intervals = tuple(int(ms) for ms in self.chat_floor_intervals)
        if any(ms < 0 for ms in self.chat_floor_intervals):
            raise ValueError("a chat floor interval is 0 (unbatched) or more ms")
        if len(set(self.chat_floor_intervals)) < len(self.chat_floor_intervals):
            # what an interval delivered is filed under its ms: two would be one
            raise ValueError("each chat floor interval once (its figures are filed by ms)")
        if self.chat_floor_intervals and self.chat_rate <= 0:
            raise ValueError("the chat floor carries the chat storm: it needs a chat rate")

    def floors(self) -> list[str]:
        """The floors to measure, in order: the bare one first."""
        return {"none": [], "both": ["bare", "rush"]}.get(str(self.floor), [str(self.floor)])

    def draw_countdown(self, rng: random.Random) -> float:
        """Seconds from go-live to BUY NOW for this run."""
        return self.countdown_s + rng.uniform(0.0, max(0.0, self.countdown_jitter_s))

    def resolved_workers(self) -> int:
        return self.server_workers or max(1, math.ceil(self.viewers / 14000))

    def resolved_swarms(self) -> int:
        return self.swarm_processes or max(2, math.ceil(self.viewers / 14000))


class Rehearsal:
    def __init__(self, cfg: RehearsalConfig) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg.max_duration_s
        self.progress = Progress()
        self.timeline: list[dict[str, Any]] = []
        self.phases: list[dict[str, Any]] = []
        self.swarms: list[SwarmProc] = []
        self.watch = None
        self._last_sample = None
        self._cpu_samples: list[float] = []
        self.notes: list[str] = []
        # The swarm processes' own CPU from the countdown through the rush ("drop": the
        # chat storm's window) and while the floor's messages go out ("floor").
        self.generator: dict[str, Any] = {}

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

    def swarm_cpu(self) -> Any:
        """A reading of the swarm processes' CPU now (a ProcSample), None if unreadable."""
        import psutil

        from loadtest.procstat import ProcWatch

        try:
            return ProcWatch([sp.proc.pid for sp in self.swarms]).sample()
        except psutil.Error:  # a swarm gone: a figure, never a reason to fail the run
            return None

    def note_swarm_cpu(self, name: str, first: Any, last: Any) -> None:
        """The load generator's CPU between two readings: it shares the machine with the
        server it measures (docs/loadtest.md, "The swarm's socket client")."""
        from loadtest.procstat import cpu_percent

        if first is None or last is None:
            return
        self.generator[name] = {"cpu_s": round(last.cpu_seconds - first.cpu_seconds, 2),
                                "window_s": round(last.t - first.t, 2),
                                "cpu_percent": cpu_percent(first, last)}

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
                sources=sources(cfg, i, n, count), rate=cfg.connect_rate / n,
                buy_probability=cfg.buy_probability, buy_delay_ms=cfg.buy_delay_ms,
                encoding=cfg.encoding, jwt_secret=jwt_secret, seed=1000 + i,
                deadline_s=self.remaining() + 30, user_prefix="lt",
                chat_sample=max(1, cfg.viewers // 500), mode=mode,
                enter_probability=cfg.enter_probability if cfg.giveaway else 0.0,
                enter_delay_ms=(0.0, cfg.giveaway_window_s * 800.0),
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest", "swarm",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                preexec_fn=die_with_parent, limit=64 << 20,
            )
            sp = SwarmProc(i, proc, scfg)
            self.progress.events[i] = asyncio.Event()
            sp.reader = asyncio.create_task(read_swarm(sp, self.progress))
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
            await creator.create(title=f"Rehearsal {cfg.viewers} viewers", units=cfg.stock,
                                 variants=cfg.variants)
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
            drop_cpu = self.swarm_cpu()
            for sp in self.swarms:
                share = cfg.chat_messages // n + (1 if sp.index < cfg.chat_messages % n else 0)
                if share:
                    await sp.send({"cmd": "chat", "count": share, "spread_s": cfg.countdown_s})
            await self.set_chat_rate(cfg.chat_rate)
            chat_started = self.progress.total("chat_sent"), time.monotonic()
            if cfg.probe_interval_s > 0:
                probe.start(cfg.probe_interval_s)
            cfg.countdown_drawn_s = cfg.draw_countdown(random.Random())
            await creator.go_live()
            await self.wait_for("countdown", lambda: False, limit_s=cfg.countdown_drawn_s,
                                note=False)
            giveaway_phase = None
            if cfg.giveaway:
                from loadtest import giveaway

                giveaway_phase = await giveaway.run_phase(self, creator)

            self.phase("buy_now")
            cpu_before = self.watch.sample() if self.watch else None
            buy_now_error = None
            try:
                await creator.buy_now()
            except (CreatorError, httpx.HTTPError) as exc:
                # No answer in time (an overloaded server): viewers may still get BUY
                # NOW; the run goes on and the report says so.
                buy_now_error = f"{type(exc).__name__}: {exc}"[:300]
                self.notes.append(f"the creator's BUY NOW request failed: {buy_now_error}")
                self.say(self.notes[-1])
            # Timed from the creator's answer: the viewers' rush is on by then, and the
            # creator's own request is not what the fault cuts.
            fault_task = (asyncio.create_task(cfg.fault.run(time.monotonic()))
                          if cfg.fault is not None else None)
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
            self.note_swarm_cpu("drop", drop_cpu, self.swarm_cpu())
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
            try:
                drop_state = (await creator.get()).get("state")
            except (CreatorError, httpx.HTTPError) as exc:  # reported, as the BUY NOW's
                drop_state = None
                self.notes.append(f"reading the drop before its end failed: "
                                  f"{type(exc).__name__}: {exc}"[:300])
                self.say(self.notes[-1])
            with contextlib.suppress(Exception):
                await creator.end()
            await self.wait_for("the end to reach every open viewer",
                                lambda: self.progress.total("ended_seen")
                                >= self.progress.total("joined"), limit_s=15)
            if cfg.chat_rate > 0 or cfg.chat_messages > 0:  # see CHAT_SETTLE_S
                await asyncio.sleep(CHAT_SETTLE_S)
            self.phase("collect")
            reports = await self.collect()
            audit = await verdict.audit(target.database_url, drop_id, creator.product_ids,
                                        reports, target)
            result = self.compose(reports, audit, t_buy_now=t_buy_now, joined=joined,
                                  connect_s=connect_s, baseline=baseline,
                                  after_connect=after_connect, cpu_window=(cpu_before,
                                                                           cpu_after))
            if giveaway_phase is not None:
                from loadtest import giveaway

                result["giveaway"] = giveaway.figures(reports, giveaway_phase)
                result["giveaway"]["audit"] = await giveaway.audit(target.database_url,
                                                                   result["giveaway"])
                result["failures"] += giveaway.judge(result)
                result["passed"] = not result["failures"]
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
        for kind in cfg.floors():
            result["floor" if kind == "bare" else "rush_floor"] = \
                await self.measure_floor(target, joined, rush=kind == "rush")
        if cfg.chat_floor_intervals:
            result["chat_floor"] = await self.measure_chat_floor(target, joined)
        verdict.compare_floor(result)
        result["generator"] = self.generator
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

    async def measure_floor(self, target: Any, viewers: int,
                            rush: bool = False) -> dict[str, Any]:
        """The same swarm, the same number of viewers, a bare broadcast server; with
        ``rush`` its viewers buy each message's product as the drop's viewers bought
        (loadtest.floor, "the rush floor"), ``stock`` units of it."""
        from dropserver.services import free_port
        from loadtest.floor import FloorServers, floor_message, rush_keys

        cfg = self.cfg
        redis_url = getattr(target, "redis_url", "")
        if not redis_url:
            return {"measured": False, "why": "no Redis of our own (remote target)"}
        from dropserver.redis_client import connect as connect_redis

        name = "rush_floor" if rush else "floor"
        self.phase(name)
        channel = "rehearsal:rush-floor" if rush else "rehearsal:floor"
        servers = FloorServers(cfg.resolved_workers(), free_port(), redis_url, channel,
                               rush=rush)
        await asyncio.to_thread(servers.start)
        redis = connect_redis(redis_url)  # one Redis or a cluster (redis+cluster://)
        self.progress = Progress()
        self.swarms = []
        sent: list[float] = []
        sold: list[dict[str, int]] = []
        try:
            connect_s = await self.connect_floor(servers, viewers,
                                                 "floor_rush" if rush else "floor",
                                                 "every floor viewer to connect")
            connected = self.progress.total("ever_joined")
            await asyncio.sleep(1.0)
            floor_cpu = self.swarm_cpu()
            server_cpu = self.floor_server_cpu(servers.pids)
            for k in range(cfg.floor_events):
                if rush:  # message k sells product k + 1
                    stock_key, buyers_key = rush_keys(channel, k + 1)
                    await redis.set(stock_key, cfg.stock)
                    await redis.delete(buyers_key)
                sent.append(time.monotonic())
                await redis.publish(channel, floor_message(k))
                await self.wait_for(f"floor message {k} to reach every viewer",
                                    lambda k=k: self.progress.total("floor_seen")
                                    >= (k + 1) * connected, limit_s=15)
                if rush:
                    event = await self.floor_rush_over(redis, channel, k)
                    so_far = event.pop("buys_so_far")
                    event["buys"] = so_far - sum(e["buys"] for e in sold)
                    sold.append(event)
                await asyncio.sleep(cfg.floor_interval_s)
            self.note_swarm_cpu(name, floor_cpu, self.swarm_cpu())
            server_cpu = (server_cpu, self.floor_server_cpu(servers.pids))
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
        out = {"measured": True, "processes": cfg.resolved_workers(),
               "viewers": connected, "connect_s": round(connect_s, 2),
               "events": len(sent), "delivered": len(lat), "expected": expected,
               "latency": summarize(lat)}
        if all(server_cpu):  # the floor servers' CPU over the messages (and buys)
            out["server_cpu_s"] = round(server_cpu[1].cpu_seconds - server_cpu[0].cpu_seconds,
                                        2)
            out["server_window_s"] = round(server_cpu[1].t - server_cpu[0].t, 2)
        if rush:
            buys: dict[str, int] = {}
            for r in reports:
                for key, count in r.get("floor_buys", {}).items():
                    buys[key] = buys.get(key, 0) + count
            out["rush"] = {
                "stock_per_event": cfg.stock, "sold": sold,
                "units_sold": sum(e["sold"] for e in sold),
                "oversold": sum(max(0, e["sold"] - cfg.stock) for e in sold),
                "buys": buys,
                "buy_latency": summarize([x for r in reports
                                          for x in r.get("floor_buy_latency", [])])}
        return out

    async def connect_floor(self, servers: Any, viewers: int, mode: str, what: str) -> float:
        """Start the swarms (``mode``) on floor servers and wait until ``viewers`` are
        connected, or every swarm has ramped and none is still connecting: the seconds
        it took."""
        cfg = self.cfg
        await self.start_swarms(servers.ws_url, 0, cfg.jwt_secret, mode=mode)
        n = len(self.swarms)
        t_connect = time.monotonic()
        await self.wait_for(
            what,
            lambda: (self.progress.total("ever_joined") >= viewers) or (
                len(self.progress.latest) == n
                and all(p.get("ramp_done") for p in self.progress.latest.values())
                and self.progress.total("connecting") == 0),
            limit_s=viewers / cfg.connect_rate * 3 + 60)
        return time.monotonic() - t_connect

    async def measure_chat_floor(self, target: Any, viewers: int) -> dict[str, Any]:
        """The same swarm, the same number of viewers, bare servers that take chat and
        deliver every message to every viewer; the same storm (``chat_rate``) for
        ``chat_floor_s`` seconds under each batch interval in turn, on the same
        sockets, each storm delivered in full (or given up after 30 s) before the next."""
        from dropserver.services import free_port
        from loadtest.floor import FloorServers, chat_control

        cfg = self.cfg
        redis_url = getattr(target, "redis_url", "")
        if not redis_url:
            return {"measured": False, "why": "no Redis of our own (remote target)"}
        from dropserver.redis_client import connect as connect_redis

        self.phase("chat_floor")
        channel = "rehearsal:chat-floor"
        intervals = cfg.chat_floor_intervals
        servers = FloorServers(cfg.resolved_workers(), free_port(), redis_url, channel,
                               chat_batch_ms=intervals[0])
        await asyncio.to_thread(servers.start)
        redis = connect_redis(redis_url)
        self.progress = Progress()
        self.swarms = []
        windows: list[dict[str, Any]] = []
        try:
            connect_s = await self.connect_floor(servers, viewers, "floor_chat",
                                                 "every chat floor viewer to connect")
            connected = self.progress.total("ever_joined")
            n = len(self.swarms)
            for ms in intervals:
                await redis.publish(channel, chat_control(ms))
                await asyncio.sleep(1.0)  # every process on the new interval
                swarm_cpu, server_cpu = self.swarm_cpu(), self.floor_server_cpu(servers.pids)
                t_start = time.monotonic()
                for sp in self.swarms:
                    await sp.send({"cmd": "chat_rate", "rate": cfg.chat_rate / n,
                                   "label": str(ms)})
                await self.wait_for("the chat floor's storm", lambda: False,
                                    limit_s=cfg.chat_floor_s, note=False)
                self.progress.chat_acks.clear()
                for sp in self.swarms:
                    await sp.send({"cmd": "chat_rate", "rate": 0})
                storm_s = time.monotonic() - t_start
                # What was sent, exactly: each swarm's answer to the stop (a busy swarm
                # reads it late, and keeps sending until then).
                await self.wait_for("every swarm to stop its chat",
                                    lambda: len(self.progress.chat_acks) == n, limit_s=30)
                sent = sum(int(a["sent"]) for a in self.progress.chat_acks.values())
                delivered = await self.wait_for(
                    f"the chat floor's storm ({ms} ms) to reach every viewer",
                    lambda sent=sent: self.progress.total("chat_seen") >= sent * connected,
                    limit_s=30)
                self.note_swarm_cpu(f"chat_floor_{ms}", swarm_cpu, self.swarm_cpu())
                after = self.floor_server_cpu(servers.pids)
                window = {"batch_ms": ms, "storm_s": round(storm_s, 2),
                          "drained": delivered}
                if server_cpu is not None and after is not None:
                    window["server_cpu_s"] = round(after.cpu_seconds - server_cpu.cpu_seconds,
                                                   2)
                    window["server_window_s"] = round(after.t - server_cpu.t, 2)
                windows.append(window)
                await asyncio.sleep(0.5)
            reports = await self.collect()
        finally:
            await self.stop_swarms()
            await redis.aclose()
            await asyncio.to_thread(servers.stop)
        out: dict[str, Any] = {"measured": True, "processes": cfg.resolved_workers(),
                               "viewers": connected, "connect_s": round(connect_s, 2),
                               "rate_asked_per_s": cfg.chat_rate,
                               "storm_s": cfg.chat_floor_s,
                               "intervals": [self.chat_floor_figures(w, reports, connected)
                                             for w in windows]}
        return out

    @staticmethod
    def chat_floor_figures(window: dict[str, Any], reports: list[dict[str, Any]],
                           connected: int) -> dict[str, Any]:
        """One interval of the chat floor: what was sent, what every viewer got, how
        long it took (the timed viewers: every Nth, as the rehearsal times chat)."""
        key = str(window["batch_ms"])
        sent = sum(int(r.get("chat_sent_by", {}).get(key, 0)) for r in reports)
        per_viewer: dict[int, int] = {}  # messages got -> viewers
        for r in reports:
            for count, nviewers in r.get("chat_floor_counts", {}).get(key, {}).items():
                per_viewer[int(count)] = per_viewer.get(int(count), 0) + int(nviewers)
        got_some = sum(per_viewer.values())
        if connected > got_some:
            per_viewer[0] = per_viewer.get(0, 0) + connected - got_some
        lat = [x for r in reports for x in r.get("chat_floor_latency", {}).get(key, ())]
        delivered = sum(count * nv for count, nv in per_viewer.items())
        counts = sorted(per_viewer)
        return {**window, "sent": sent,
                "sent_per_s": round(sent / window["storm_s"], 1) if window["storm_s"] else None,
                "expected": sent * connected, "delivered": delivered,
                "per_viewer": {"min": counts[0] if counts else None,
                               "max": counts[-1] if counts else None,
                               "viewers_with_all": per_viewer.get(sent, 0)},
                "latency": summarize(lat)}

    @staticmethod
    def floor_server_cpu(pids: list[int]) -> Any:
        """A reading of the floor servers' CPU now (a ProcSample), None if unreadable."""
        import psutil

        from loadtest.procstat import ProcWatch

        try:
            return ProcWatch(pids).sample()
        except psutil.Error:
            return None

    async def floor_rush_over(self, redis: Any, channel: str, k: int) -> dict[str, int]:
        """Wait, as the drop's rush does, until every buy of message ``k`` is answered;
        then what the rush floor sold of product ``k + 1``: the units gone from its
        stock, and the buyers its script recorded."""
        from loadtest.floor import rush_keys

        buyers = self.progress.total("buys_sent")
        await asyncio.sleep(self.cfg.buy_delay_ms[1] / 1000.0 + 0.3)

        def answered() -> bool:
            p = self.progress
            replied = (p.total("buy_held") + p.total("buy_sold_out")
                       + p.total("buy_rejected") + p.total("buy_no_reply"))
            return replied >= p.total("buys_sent") >= buyers
        await self.wait_for(f"every buy of floor message {k} to be answered", answered,
                            limit_s=self.cfg.rush_timeout_s)
        stock_key, buyers_key = rush_keys(channel, k + 1)
        left = int(await redis.get(stock_key) or 0)
        return {"sold": self.cfg.stock - left, "buyers": int(await redis.hlen(buyers_key)),
                "buys_so_far": self.progress.total("buys_sent")}

    # -- the result -------------------------------------------------------------------------------
    def compose(self, reports: list[dict[str, Any]], audit: dict[str, Any],
                **figures_of_run: Any) -> dict[str, Any]:
        """The run's result (:func:`loadtest.figures.compose`) with its timeline, phases,
        notes and server samples."""
        return figures.compose(self.cfg, reports, audit, watch=self.watch,
                               cpu_samples=self._cpu_samples, timeline=self.timeline,
                               phases=self.phases, notes=self.notes, **figures_of_run)


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
