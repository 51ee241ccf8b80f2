"""Cleans up after the cluster harness when it stops, however it stops.

Usage: ``python -m loadtest._netreaper``. The harness writes one resource per line to
our stdin and keeps the pipe open: ``netns NAME`` (a network namespace: every process
in it is killed, then it is deleted) or ``link NAME`` (a network device of the root
namespace, the bridge). When the pipe closes (a normal stop, or the harness was
killed, even with SIGKILL), we kill what is left in the namespaces and delete them
and the devices: a harness leaves no namespace, device or node process behind. (Its
other processes die by themselves: HAProxy under ``setpriv --pdeathsig``, Redis and
PostgreSQL with :class:`dropserver.services.LocalServices` and its own reaper.)
:func:`remove` is the same clean-up, called directly by ``cluster down`` and by the
harness's own stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

from dropserver._reaper import _alive

__all__ = ["alive", "netns_pids", "remove"]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (the launcher's reaper's own test)."""
    return _alive(pid)


def netns_pids(name: str) -> list[int]:
    """The processes inside network namespace ``name`` (``ip netns pids``)."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                         check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _kill(pids: Iterable[int]) -> list[int]:
    killed = []
    for pid in pids:
        if pid != os.getpid() and alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def remove(resources: Iterable[tuple[str, str]], *, wait_s: float = 10.0) -> None:
    """Kill every process of the namespaces, then delete the namespaces and the
    links. Idempotent: what is already gone is skipped."""
    items = list(resources)
    namespaces = [v for k, v in items if k == "netns"]
    pids = [p for ns in namespaces for p in netns_pids(ns)]
    killed = _kill(pids)
    deadline = time.monotonic() + wait_s
    while any(alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
    for kind, name in items:
        if kind == "link":
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def main() -> int:
    # Only the pipe ends this process; terminal signals are for the harness.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    resources: list[tuple[str, str]] = []
    for raw in sys.stdin.buffer:
        kind, _, name = raw.decode(errors="replace").strip().partition(" ")
        if kind in ("netns", "link") and name:
            resources.append((kind, name))
    remove(resources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
