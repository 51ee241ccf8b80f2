"""nginx as a caching proxy in front of the LL-HLS origin: a CDN edge on this machine.

The configuration is one template, ``loadtest/nginx-cdn.conf`` (quoted whole in
docs/streaming.md, "Behind a CDN"): :func:`render` fills in its ``@FIELD@`` placeholders and
nothing else. :class:`Cdn` runs it as one nginx process tied to this one (it dies
with it), for tests and benchmarks::

    python -m loadtest.cdn render --listen 0.0.0.0:8080 --origin 10.0.0.5:8000 \\
        --cache-dir /var/cache/nginx/hls --run-dir /run/nginx-hls
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TEMPLATE", "Cdn", "CdnError", "find_nginx", "render"]

TEMPLATE = Path(__file__).with_name("nginx-cdn.conf")
_FIELD = re.compile(r"@([A-Z_]+)@")


class CdnError(RuntimeError):
    """nginx is missing, refuses its configuration, or does not come up."""


def find_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise CdnError("nginx is not installed (Debian: apt-get install nginx)")
    return found


def render(*, listen: str, origin: str, cache_dir: str, run_dir: str, workers: int = 1,
           connections: int = 0, template: str | None = None) -> str:
    """The template with every ``@FIELD@`` filled; a field it does not know is a
    KeyError (never half filled). ``connections`` 0: as many as this process may
    open, less some to spare (nginx needs two per proxied viewer)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = hard if hard != resource.RLIM_INFINITY else 65536
    values = {"LISTEN": listen, "ORIGIN": origin, "CACHE_DIR": cache_dir,
              "RUN_DIR": run_dir, "WORKERS": str(workers), "NOFILE": str(nofile),
              "CONNECTIONS": str(connections or max(1024, nofile - 200))}
    text = template if template is not None else TEMPLATE.read_text()
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Cdn:
    """One nginx (no master process: it dies with us) on ``host:port`` in front of
    ``origin`` (``host:port``), its cache and files under ``run_dir``."""

    run_dir: Path
    origin: str
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "nginx.conf"

    def write_config(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _free_port(self.host)
        self.config_path.write_text(render(
            listen=f"{self.host}:{self.port}", origin=self.origin,
            cache_dir=str(self.run_dir / "cache"), run_dir=str(self.run_dir)))
        check = subprocess.run([find_nginx(), "-t", "-q", "-p", str(self.run_dir), "-c",
                                str(self.config_path)], capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            raise CdnError(f"nginx -t refused {self.config_path}:\n{check.stderr}")
        return self.config_path

    def start(self, timeout: float = 20.0) -> None:
        from dropserver.services import _setpriv

        self.write_config()
        log = open(self.run_dir / "nginx.out", "ab")
        try:
            # One process in the foreground, so that it dies with us (pdeathsig);
            # nginx's worker processes would outlive a killed master.
            self.proc = subprocess.Popen(
                [*_setpriv(as_nobody=False), find_nginx(), "-p", str(self.run_dir), "-c",
                 str(self.config_path), "-g", "daemon off; master_process off;"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise CdnError(f"nginx exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise CdnError("nginx did not come up: " + self.log_tail()) from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        out = []
        for name in ("nginx.out", "error.log"):
            path = self.run_dir / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Cdn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cdn",
                                     description="Print loadtest/nginx-cdn.conf filled in.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render")
    r.add_argument("--listen", default="0.0.0.0:8080")
    r.add_argument("--origin", required=True, help="host:port of dropserver (or a balancer)")
    r.add_argument("--cache-dir", default="/var/cache/nginx/hls")
    r.add_argument("--run-dir", default="/run/nginx-hls")
    r.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    print(render(listen=args.listen, origin=args.origin, cache_dir=args.cache_dir,
                 run_dir=args.run_dir, workers=args.workers), end="")


if __name__ == "__main__":
    main()
