"""Server-side resource figures: resident memory and CPU of a set of processes.

A thin adapter over psutil (which reads ``/proc/<pid>/status`` and ``/proc/<pid>/stat``
on Linux). Works only where the server runs on this machine: for a remote target the
rehearsal reports these figures as unknown rather than guessing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

__all__ = ["ProcSample", "ProcWatch", "cpu_percent", "server_processes"]


@dataclass(frozen=True)
class ProcSample:
    """One reading of a group of processes."""

    t: float  # time.monotonic()
    rss_bytes: int  # sum of resident set sizes
    cpu_seconds: float  # sum of user + system CPU time since each process started
    per_pid_rss: dict[int, int] = field(default_factory=dict)


def server_processes(root_pid: int) -> list[psutil.Process]:
    """The worker processes under a ``dropserver serve`` supervisor (or the root itself).

    The supervisor only sleeps and restarts workers; counting it would hide the
    per-connection figure under its own ~30 MB, so it is left out when it has children.
    """
    root = psutil.Process(root_pid)
    children = root.children(recursive=True)
    return children or [root]


class ProcWatch:
    """Reads RSS and CPU time of a fixed set of pids; tolerates processes that exit."""

    def __init__(self, pids: list[int]) -> None:
        self._procs = {pid: psutil.Process(pid) for pid in pids}
        # A process that exits keeps its last CPU reading in the sum (a killed node in
        # a fault rehearsal), so CPU per wall second never goes negative.
        self._last_cpu: dict[int, float] = {}

    @property
    def pids(self) -> list[int]:
        return list(self._procs)

    def sample(self) -> ProcSample:
        rss = 0
        cpu = 0.0
        per: dict[int, int] = {}
        for pid, proc in self._procs.items():
            try:
                with proc.oneshot():
                    mem = proc.memory_info().rss
                    times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                cpu += self._last_cpu.get(pid, 0.0)
                continue
            per[pid] = mem
            rss += mem
            self._last_cpu[pid] = times.user + times.system
            cpu += times.user + times.system
        return ProcSample(time.monotonic(), rss, cpu, per)


def cpu_percent(first: ProcSample, last: ProcSample) -> float | None:
    """Average CPU use between two samples, in percent of one core (200 = 2 cores)."""
    elapsed = last.t - first.t
    if elapsed <= 0:
        return None
    return round(100.0 * (last.cpu_seconds - first.cpu_seconds) / elapsed, 1)
