"""Where a rehearsal points: a local server it starts itself, or a remote deployment.

:class:`LocalTarget` starts Redis and PostgreSQL with :class:`dropserver.services.LocalServices`
(the same launcher as ``dropserver dev``), applies the schema, then runs
``dropserver serve --workers N`` on a loopback port as a child process that dies with
the rehearsal (``PR_SET_PDEATHSIG``). :class:`RemoteTarget` only carries URLs and the
token settings; nothing is started and server-side figures are reported as unknown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dropserver.db import migrate_database
from dropserver.lifeline import die_with_parent
from dropserver.services import LocalServices, free_port
from dropserver.settings import Settings, load_settings, unsafe_rig_env

__all__ = ["ClusterTarget", "LocalTarget", "RemoteTarget", "Target", "die_with_parent"]

class Target(Protocol):
    base_url: str  # http(s)://host:port
    ws_url: str  # ws(s)://host:port/ws
    database_url: str  # "" when the rehearsal cannot read the database
    settings: Settings  # token settings (secret, audience, issuer)
    server_pids: list[int]  # processes whose RSS/CPU are measured ([] when remote)


def _wait_ready(base_url: str, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} not ready in time ({last})")


@dataclass
class RemoteTarget:
    """A deployment someone else runs: ``--target https://drops.example.com``."""

    base_url: str
    settings: Settings
    database_url: str = ""
    ws_url: str = ""
    server_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.ws_url:
            scheme, _, rest = self.base_url.partition("://")
            self.ws_url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/ws"

    def __enter__(self) -> RemoteTarget:
        _wait_ready(self.base_url, time.monotonic() + 10)
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class LocalTarget:
    """``dropserver serve --workers N`` on 127.0.0.1 with local Redis and PostgreSQL."""

    workers: int = 2
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)  # extra DROPSERVER_* for the server
    log_path: Path | None = None
    base_url: str = ""
    ws_url: str = ""
    database_url: str = ""
    redis_url: str = ""
    settings: Settings = field(default_factory=lambda: load_settings({}, dev=True))
    server_pids: list[int] = field(default_factory=list)
    backend_pids: dict[str, int] = field(default_factory=dict)
    _services: LocalServices | None = None
    _proc: subprocess.Popen | None = None
    _log: object | None = None

    def __enter__(self) -> LocalTarget:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        from loadtest.procstat import server_processes

        deadline = time.monotonic() + timeout
        self._services = LocalServices().start()
        self.redis_url = self._services.redis_url
        self.database_url = self._services.database_url
        self.backend_pids = dict(self._services.pids)
        asyncio.run(migrate_database(self.database_url))
        port = free_port(self.host)
        env = dict(os.environ)
        env.update({
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            **unsafe_rig_env(),  # fake payments; tokens signed with the dev secret
            "DROPSERVER_HOST": self.host,
            "DROPSERVER_PORT": str(port),
            "DROPSERVER_WORKERS": str(self.workers),
            "DROPSERVER_LOG_LEVEL": "warning",
            "DROPSERVER_SHUTDOWN_GRACE": "2",
        })
        env.pop("DROPSERVER_JWKS_URL", None)
        env.update(self.env)
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            # -P: the working directory is not put first on sys.path, so PYTHONPATH in
            # `env` (rehearse --server-env) picks which checkout serves (an A/B).
            [sys.executable, "-P", "-m", "dropserver.cli", "serve"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        self.base_url = f"http://{self.host}:{port}"
        self.ws_url = f"ws://{self.host}:{port}/ws"
        _wait_ready(self.base_url, deadline)
        # Every worker must be up, not only the first to answer /readyz.
        while time.monotonic() < deadline:
            procs = server_processes(self._proc.pid)
            if len(procs) >= self.workers:
                break
            time.sleep(0.1)
        self.server_pids = [p.pid for p in server_processes(self._proc.pid)]
        self.settings = load_settings({}, dev=True)

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if self._services is not None:
            self._services.stop()
            self._services = None



@dataclass
class ClusterTarget:
    """The balancer of a :class:`loadtest.cluster.Cluster` run in this process: like a
    remote deployment, plus its database and Redis (the audit reads both) and its
    nodes' worker processes (memory and CPU), since they run on this machine. The
    cluster is started and stopped by its owner, not by the rehearsal."""

    cluster: object  # loadtest.cluster.Cluster (not imported: it needs root)
    settings: Settings = field(default_factory=lambda: load_settings({}, dev=True))

    @property
    def base_url(self) -> str:
        return self.cluster.base_url  # type: ignore[attr-defined]

    @property
    def ws_url(self) -> str:
        return self.cluster.ws_url  # type: ignore[attr-defined]

    @property
    def database_url(self) -> str:
        return self.cluster.database_url  # type: ignore[attr-defined]

    @property
    def redis_url(self) -> str:
        return self.cluster.redis_url  # type: ignore[attr-defined]

    @property
    def server_pids(self) -> list[int]:
        """Every node's workers (their ``serve`` supervisors only wait)."""
        from loadtest.procstat import server_processes

        return [p.pid for node in self.cluster.nodes  # type: ignore[attr-defined]
                if node.running() for p in server_processes(node.proc.pid)]

    def __enter__(self) -> ClusterTarget:
        _wait_ready(self.base_url, time.monotonic() + 10)
        return self

    def __exit__(self, *exc: object) -> None:
        return None
