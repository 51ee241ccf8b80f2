"""HAProxy in front of the harness's nodes: its configuration, processes and state.

The configuration is one template, ``loadtest/haproxy.cfg`` (documented in
docs/operations.md, "Deployment"): :func:`render` fills in the listening address, the
nodes, ``maxconn`` and the stats socket, and nothing else. HAProxy needs two file
descriptors per viewer; where one process may not open enough (this machine caps every
process at 20,000 and the harness cannot raise it), :class:`Balancer` runs several
identical processes on the same address: HAProxy binds with ``SO_REUSEPORT``, so the
kernel spreads the viewers' connections over them. Each process checks the nodes'
``/readyz`` on its own. :func:`server_states` reads a process's view of the nodes from
its stats socket (``show stat``).
"""

from __future__ import annotations

import csv
import io
import resource
import shutil
import socket
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TEMPLATE", "Balancer", "BalancerError", "find_haproxy", "max_connections",
           "render", "server_states"]

TEMPLATE = Path(__file__).with_name("haproxy.cfg")


class BalancerError(RuntimeError):
    """HAProxy is missing, refuses its configuration, or does not come up."""


def find_haproxy() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        raise BalancerError("haproxy is not installed (Debian: apt-get install haproxy)")
    return found


def max_connections() -> int:
    """The most viewers one HAProxy process can hold here: two descriptors each, under
    this process's open-files limit (which the child inherits), with room to spare."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return max(100, (limit - 500) // 2)


def render(*, bind: str, servers: list[tuple[str, str]], maxconn: int,
           stats_socket: str, template: str | None = None) -> str:
    """The template with its fields filled: ``servers`` are (name, host:port)."""
    text = template if template is not None else TEMPLATE.read_text()
    lines = "\n".join(f"    server {name} {addr}" for name, addr in servers)
    return string.Template(text).substitute(bind=bind, servers=lines, maxconn=maxconn,
                                            stats_socket=stats_socket)


def _stats(sock_path: str, command: str, timeout: float = 2.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def server_states(sock_path: str, backend: str = "nodes") -> dict[str, dict[str, str]]:
    """Each node as one HAProxy process sees it: ``{name: {status, scur, ...}}``
    (``status``: ``UP``, ``DOWN``, ``MAINT``, ``UP 1/2`` while rising, ...)."""
    raw = _stats(sock_path, "show stat").lstrip("# ")
    rows = csv.DictReader(io.StringIO(raw))
    return {row["svname"]: {"status": row["status"], "scur": row["scur"],
                            "check_status": row.get("check_status", ""),
                            "chkdown": row.get("chkdown", "")}
            for row in rows
            if row.get("pxname") == backend and row.get("svname") not in ("BACKEND",
                                                                          "FRONTEND")}


@dataclass
class Balancer:
    """``processes`` HAProxy processes sharing ``host:port``, configs under ``run_dir``."""

    run_dir: Path
    host: str
    port: int
    servers: list[tuple[str, str]]
    processes: int = 1
    maxconn: int = 0  # per process; 0: :func:`max_connections`
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def sockets(self) -> list[str]:
        return [str(self.run_dir / f"haproxy-{k}.sock") for k in range(1, self.processes + 1)]

    def config_paths(self) -> list[Path]:
        return [self.run_dir / f"haproxy-{k}.cfg" for k in range(1, self.processes + 1)]

    def write_configs(self) -> list[Path]:
        maxconn = self.maxconn or max_connections()
        paths = self.config_paths()
        for path, sock in zip(paths, self.sockets(), strict=True):
            path.write_text(render(bind=f"{self.host}:{self.port}", servers=self.servers,
                                   maxconn=maxconn, stats_socket=sock))
        exe = find_haproxy()
        check = subprocess.run([exe, "-c", "-q", "-f", str(paths[0])], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise BalancerError(f"haproxy -c refused {paths[0]}:\n{check.stdout}{check.stderr}")
        return paths

    def start(self, timeout: float = 20.0) -> None:
        paths = self.write_configs()
        for k in range(1, len(paths) + 1):
            self.procs.append(self._spawn(k))
        for k in range(1, len(paths) + 1):
            self._wait_up(k, time.monotonic() + timeout)

    def _spawn(self, k: int) -> subprocess.Popen:
        from dropserver.services import _setpriv

        log = open(self.run_dir / f"haproxy-{k}.log", "ab")
        try:
            # -db: stay in the foreground, so it dies with us (pdeathsig).
            return subprocess.Popen(
                [*_setpriv(as_nobody=False), find_haproxy(), "-db", "-f",
                 str(self.config_paths()[k - 1])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()

    def _wait_up(self, k: int, deadline: float) -> None:
        """Until process ``k`` (1-based) answers on its stats socket."""
        proc, sock = self.procs[k - 1], self.sockets()[k - 1]
        while True:
            if proc.poll() is not None:
                raise BalancerError(f"haproxy exited with {proc.returncode}: "
                                    + self.log_tail(k))
            try:
                server_states(sock)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise BalancerError("haproxy did not come up: "
                                        + self.log_tail(k)) from None
                time.sleep(0.05)

    def kill_process(self, k: int) -> float:
        """SIGKILL HAProxy process ``k`` (1-based): every socket through it closes, as
        when a balancer machine is lost; the others keep the port. Returns the
        monotonic time of the kill."""
        proc = self.procs[k - 1]
        at = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
        return at

    def start_process(self, k: int, timeout: float = 20.0) -> None:
        """Start process ``k`` again (after :meth:`kill_process`), same configuration."""
        if self.procs[k - 1].poll() is None:
            raise BalancerError(f"haproxy process {k} is running")
        self.procs[k - 1] = self._spawn(k)
        self._wait_up(k, time.monotonic() + timeout)

    def states(self) -> list[dict[str, dict[str, str]]]:
        """:func:`server_states` of every process ({} for one that does not answer)."""
        out = []
        for sock in self.sockets():
            try:
                out.append(server_states(sock))
            except OSError:
                out.append({})
        return out

    def wait_status(self, name: str, up: bool, timeout: float = 30.0) -> float:
        """Until every process sees node ``name`` UP (or not UP); seconds it took."""
        started = time.monotonic()
        while True:
            states = self.states()
            if all((s.get(name, {}).get("status", "") == "UP") == up for s in states):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise BalancerError(f"{name} not {'UP' if up else 'DOWN'} after {timeout} s: "
                                    f"{[s.get(name) for s in states]}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # hard stop: open connections close now
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def log_tail(self, k: int, n: int = 2000) -> str:
        try:
            return (self.run_dir / f"haproxy-{k}.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"
