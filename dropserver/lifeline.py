"""A child process dies with its parent, however the parent dies (SIGKILL included).

Two mechanisms, because neither is enough alone:

* Linux's ``PR_SET_PDEATHSIG`` (``prctl(2)``): the kernel signals the child the moment
  the parent thread that forked it exits. Set from the child itself, it races with a
  parent that died first, so the child then checks ``getppid()``.
* A watchdog thread waiting for the parent to exit: on other systems it is the only
  one, and everywhere it stops a child whose graceful stop hangs (it exits hard after a
  grace). On Linux (5.3 and later) it sleeps on a ``pidfd`` of the parent, which turns
  readable when the parent exits: no wake-up while the parent lives. Elsewhere it polls
  ``getppid()`` every ``interval`` (0.5 s): two wake-ups a second in every worker for
  as long as it runs (issue 16's idle work).

The server workers use both (``dropserver/serve.py``): SIGTERM, so a worker drains its
viewers with a ``going_away`` as on a normal stop, then a hard exit after
``DROPSERVER_SHUTDOWN_GRACE`` + 5 s. The local Redis and PostgreSQL of
``dropserver dev`` use ``setpriv --pdeathsig KILL`` (``dropserver/services.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["die_with_parent", "set_parent_death_signal", "watch_parent"]

log = logging.getLogger("dropserver.lifeline")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where
    that is not possible (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when the
    process that started it dies."""

    def apply() -> None:
        set_parent_death_signal(sig)

    return apply


def _wait_for_exit(parent_pid: int) -> None:
    """Block until ``parent_pid``, this process's parent, exits, where a ``pidfd`` can
    tell (Linux 5.3+); return at once where it cannot (the caller polls)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return
    try:
        fd = pidfd_open(parent_pid)
    except OSError:  # no pidfd here (ENOSYS, a sandbox), or the parent is gone
        return
    try:
        # Opened while the parent still is our parent, the fd is the parent's: a live
        # process's pid is not reused.
        if os.getppid() != parent_pid:
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()  # readable once the process exits
    finally:
        os.close(fd)


def watch_parent(parent_pid: int, *, sig: int = signal.SIGTERM, grace: float,
                 interval: float = 0.5) -> threading.Thread:
    """Tie this process to ``parent_pid``: ``PR_SET_PDEATHSIG`` where there is one, and a
    watchdog thread that sends ``sig`` itself where there is none, then exits the
    process hard if it is still here ``grace`` seconds after the parent went. The
    thread waits on a ``pidfd`` of the parent where there is one, else it looks every
    ``interval`` seconds."""
    kernel = set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # the parent died before the kernel was told
        os.kill(os.getpid(), sig)

    def watch() -> None:
        _wait_for_exit(parent_pid)
        while os.getppid() == parent_pid:
            time.sleep(interval)
        log.warning("parent process %d is gone; stopping", parent_pid)
        if not kernel:  # the kernel has sent it already: a second one would force
            with contextlib.suppress(OSError):
                os.kill(os.getpid(), sig)
        time.sleep(grace)
        log.error("still running %.0f s after the parent went; exiting", grace)
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="lifeline", daemon=True)
    thread.start()
    return thread
