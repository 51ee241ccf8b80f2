"""Running the app: one process, or N worker processes sharing a port.

Workers each bind their own listening socket with ``SO_REUSEPORT``; the kernel
spreads new connections across them. The supervisor holds a bound (not listening)
socket on the same port so ``--port 0`` resolves once for all, restarts a worker
that dies, and forwards SIGTERM/SIGINT so every worker drains: it stops accepting,
tells each viewer "going away, reconnect after N ms" (jittered), then stops.
Workers die with the supervisor however it dies, SIGKILL included
(:mod:`dropserver.lifeline`): they drain as on SIGTERM, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

import uvicorn

from dropserver.settings import Settings, load_settings
from realtime.board import BOARD_ENV, INDEX_ENV, FanoutBoard

__all__ = ["bind_socket", "run_single", "run_supervisor", "sweep_metrics_dirs",
           "worker_command"]

log = logging.getLogger("dropserver.serve")

SUPERVISOR_PID = "DROPSERVER_SUPERVISOR_PID"  # set for the workers: whom they die with
METRICS_PREFIX = "dropserver-metrics-"  # a supervisor's folder in the temp dir
OWNER_FILE = "owner"  # in that folder: its supervisor's process mark


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket
    # says TCP, and accepted sockets take the listening one's proto (with 0, Nagle
    # held each second write of a kept-alive connection for the peer's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(4096)
    sock.set_inheritable(True)
    return sock


# The tick wakes this long after each second of the wall clock begins, so that the Date
# header it sets names that second (asyncio's timers may fire up to a clock tick early).
DATE_SLACK_S = 0.005


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the app before stopping, and whose
    main loop wakes once a second (to set the Date header) or when told to stop.

    uvicorn's own loop wakes 10 times a second to look at ``should_exit`` (and, every
    tenth wake, to set the Date header): ~10 wake-ups a second in every idle worker
    (issue 16; ``python -m benchmarks.idle``). Here ``should_exit`` is a property that
    wakes the loop when set (from the loop, a signal handler or another thread), so a
    stop is as prompt as before; the Date header is set just after each wall-clock
    second begins, so it names the second a response is written (uvicorn's, set once a
    second at the phase the server started at, lagged by up to a second more). With
    ``limit_max_requests`` or ``callback_notify`` set (not set by dropserver) uvicorn's
    own loop runs, unchanged: it counts requests at each tick.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout: float, *,
                 supervised: bool = False) -> None:
        self._should_exit = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        super().__init__(config)
        self._drain_timeout = drain_timeout
        self._supervised = supervised
        self._draining: asyncio.Task | None = None

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self._wake_main_loop()

    def _wake_main_loop(self) -> None:
        # Thread-safe, and from a signal handler too: it writes to the loop's self-pipe.
        # A plain call_soon from a signal handler that interrupted the loop's epoll_wait
        # runs only when the loop next wakes (its next timer: up to a second here).
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    async def main_loop(self) -> None:
        if self.limit_max_requests is not None or self.config.callback_notify is not None:
            await super().main_loop()
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # counter 0: on_tick sets the Date header; it returns should_exit
        while not await self.on_tick(0):
            delay = 1.0 - time.time() % 1.0 + DATE_SLACK_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._supervised and sig == signal.SIGINT:
            # A terminal's Ctrl-C reaches the whole process group: the supervisor
            # forwards it to this worker as SIGTERM. Taken here too, the two made a
            # "second signal" and the worker skipped its app's shutdown.
            return
        if self._draining is not None or self.should_exit:
            # A second signal: stop now.
            self.force_exit = True
            self.should_exit = True
            return
        loop = asyncio.get_event_loop()
        self._draining = loop.create_task(self._drain_then_exit())
        # This runs in a signal handler: wake the loop so the drain starts now, not at
        # its next timer.
        loop.call_soon_threadsafe(_nothing)

    async def _drain_then_exit(self) -> None:
        # Stop accepting first, so a drained viewer reconnects to another worker.
        for server in getattr(self, "servers", []):
            server.close()
        app = self.config.loaded_app
        drain = _find_drain(app)
        if drain is not None:
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await drain()
            except TimeoutError:
                log.warning("drain timed out")
            except Exception:
                log.exception("drain failed")
        self.should_exit = True


def _nothing() -> None:
    pass


def _find_drain(app: object):
    # uvicorn wraps the app (proxy headers, message logger); walk down to Starlette.
    for _ in range(8):
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "drain"):
            return state.drain
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    # /ws bypasses Starlette's stack and uvicorn keeps no handshake per socket:
    # ~27 -> ~20 KiB per idle viewer (realtime/asgi.py, docs/topics/realtime.md).
    from realtime.asgi import FastPath, LeanHttpToolsProtocol, LeanWebSocketProtocol

    return uvicorn.Config(
        FastPath(app),
        # Named, never "auto": uvicorn's auto takes uvloop whenever it is importable,
        # and it is installed (the bench clients use it). Auto made every worker run on
        # uvloop whatever DROPSERVER_EVENT_LOOP said; at 50,000 viewers that cut the
        # rehearsal's connect rate to a third (docs/benchmarks.md, rehearsal).
        loop=settings.event_loop,
        lifespan="on",
        log_config=None,
        access_log=False,
        # httptools: llhttp in C; h11 parses in Python (HLS: ~10 requests/s a viewer).
        http=LeanHttpToolsProtocol,
        ws=LeanWebSocketProtocol,  # websockets-sansio, leaner
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=False,  # ~50 KiB per socket with deflate; see memory docs
        ws_ping_interval=None,  # the gateway sends its own heartbeats
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        backlog=4096,
        server_header=False,
        proxy_headers=True,
    )


def run_single(settings: Settings, sock: socket.socket | None = None, *,
               supervised: bool = False) -> None:
    """Run one worker in this process (serving ``sock`` or host:port); ``supervised``:
    a worker of :func:`run_supervisor`, which stops it with SIGTERM."""
    from dropserver.app import create_app

    app = create_app(settings)
    config = uvicorn_config(app, settings)
    if sock is None:
        sock = bind_socket(settings.host, settings.port, reuse_port=False)
    server = _DrainingServer(config, drain_timeout=settings.shutdown_grace,
                             supervised=supervised)
    apply_gc_threshold(settings)
    server.run(sockets=[sock])


def apply_gc_threshold(settings: Settings) -> None:
    """``DROPSERVER_GC_THRESHOLD``. A full collection stops a worker's loop for ~80 us
    per socket it holds; the default runs them 10x less often than Python's. Much
    rarer ones keep closed connections' cycles (asyncio transports) for hours
    (``python -m benchmarks.churn``, docs/benchmarks.md)."""
    gc.set_threshold(*(int(x) for x in settings.gc_threshold))


def _worker_main() -> None:
    """Entry of a worker started by the supervisor (settings come from the env)."""
    from dropserver.lifeline import watch_parent
    from dropserver.observability import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    supervisor = os.environ.get(SUPERVISOR_PID)
    if supervisor:
        # However the supervisor dies (SIGKILL too), this worker drains and stops.
        watch_parent(int(supervisor), sig=signal.SIGTERM,
                     grace=settings.shutdown_grace + 5)
    sock = bind_socket(settings.host, settings.port, reuse_port=True)
    run_single(settings, sock, supervised=bool(supervisor))


WORKER_ENTRY = "from dropserver.serve import _worker_main; _worker_main()"


def worker_command(entry: str = WORKER_ENTRY) -> list[str]:
    """A worker's command line: this interpreter, importing from this process's
    ``sys.path`` exactly. ``python -c`` alone puts the working directory first, so a
    supervisor that imported one checkout (``python -P`` with ``PYTHONPATH``, as an A/B
    benchmark starts the code before a change; or the installed ``dropserver``
    command run inside another checkout) had workers serving whatever code the
    working directory held."""
    return [sys.executable, "-c", f"import sys; sys.path[:] = {sys.path!r}; {entry}"]


def _process_mark(pid: int) -> str | None:
    """``pid`` and, on Linux, its start time (``/proc/PID/stat`` field 22), so that a
    reused pid is not taken for the process that had it; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:  # no procfs: the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)
    # The name (field 2) is in parentheses and may hold spaces: count after its ")".
    return f"{pid} {stat.rsplit(b')', 1)[1].split()[19].decode()}"


def sweep_metrics_dirs(base: str | None = None) -> list[str]:
    """Remove the metrics folders of supervisors that are gone. A supervisor removes
    its own when it stops; one killed with SIGKILL cannot. Folders without an owner
    mark (being created, or left by older versions) are not touched."""
    removed = []
    base = base or tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            if not entry.name.startswith(METRICS_PREFIX) or entry.is_symlink():
                continue
            try:
                with open(os.path.join(entry.path, OWNER_FILE)) as f:
                    owner = f.read().strip()
            except OSError:
                continue
            pid = owner.split(" ", 1)[0]
            if not pid.isdigit() or _process_mark(int(pid)) == owner:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _metrics_dir() -> str:
    """This supervisor's folder for the workers' metrics files and board, marked as its
    own (written whole, by rename) after sweeping those of dead supervisors."""
    for path in sweep_metrics_dirs():
        log.info("removed a dead supervisor's metrics folder", extra={"path": path})
    path = tempfile.mkdtemp(prefix=METRICS_PREFIX)
    mark = os.path.join(path, OWNER_FILE)
    with open(mark + ".tmp", "w") as f:
        f.write(f"{_process_mark(os.getpid())}\n")
    os.replace(mark + ".tmp", mark)
    return path


def run_supervisor(settings: Settings, *, extra_env: dict[str, str] | None = None,
                   on_ready=None) -> int:
    """Run ``settings.workers`` worker processes on one port until signalled."""
    # Resolve the port once; hold it so it cannot be taken between restarts.
    holder = bind_socket(settings.host, settings.port, reuse_port=True, listen=False)
    port = holder.getsockname()[1]
    metrics_dir = _metrics_dir()
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update({
        SUPERVISOR_PID: str(os.getpid()),
        "DROPSERVER_HOST": settings.host,
        "DROPSERVER_PORT": str(port),
        "DROPSERVER_WORKERS": "1",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    })
    if settings.workers > 1:
        # The workers hold their viewers' commands while any of them is writing a drop
        # event (realtime.board).
        board = os.path.join(metrics_dir, "fanout-board")
        FanoutBoard.create(board, settings.workers)
        env[BOARD_ENV] = board
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    if settings.dev:
        env["DROPSERVER_DEV"] = "1"
    stopping = False
    procs: dict[int, subprocess.Popen] = {}

    def spawn(index: int) -> None:
        wenv = dict(env)
        base = settings.node_id or socket.gethostname()
        wenv["DROPSERVER_NODE_ID"] = f"{base}:w{index}:{os.getpid()}"
        wenv[INDEX_ENV] = str(index)
        procs[index] = subprocess.Popen(worker_command(), env=wenv)

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(settings.workers):
            spawn(i)
        log.info("supervisor started", extra={"workers": settings.workers, "port": port})
        if on_ready is not None:
            on_ready(port)
        while True:
            time.sleep(0.2)
            if stopping:
                deadline = time.monotonic() + settings.shutdown_grace + 5
                for proc in procs.values():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    if proc.poll() is None:
                        proc.kill()
                return 0
            for index, proc in list(procs.items()):
                if proc.poll() is not None:
                    log.error("worker exited; restarting", extra={
                        "worker": index, "returncode": proc.returncode})
                    spawn(index)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
