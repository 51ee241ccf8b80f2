"""Cleans up after `LocalServices` when its parent dies, however it dies.

Usage: ``python -m dropserver._reaper DIR``. The parent writes one child pid per
line to our stdin and keeps the pipe open. When the pipe closes (a normal stop, or
the parent was killed, even with SIGKILL), we kill the pids still alive, wait for
them to go and delete DIR. The servers also die by themselves (PR_SET_PDEATHSIG);
this process makes sure their data directory goes with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m dropserver._reaper DIR", file=sys.stderr)
        return 2
    root = argv[1]
    # Only the pipe ends this process; terminal signals are for the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids: list[int] = []
    for line in sys.stdin.buffer:
        line = line.strip()
        if line.isdigit():
            pids.append(int(line))
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
