"""Background loops: a step run every few seconds until the process stops.

:func:`stop_task` is how every background task of the process is stopped at shutdown:
cancelled, and cancelled again while it runs on, for at most a few seconds. A task that
swallowed its cancellation (a library catching ``CancelledError`` in a ``finally`` that
awaits again) must not hold the server's shutdown forever: past the bound it is left
behind with a warning naming the await it is suspended in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Periodic", "Scheduled", "stop_task"]

STOP_WITHIN = 5.0  # seconds a task gets to end once cancelled at shutdown


def _suspended_in(task: asyncio.Task) -> str:
    """The awaits ``task`` is suspended in, innermost last."""
    where, coro = [], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(where[-6:]) or repr(task)


async def stop_task(task: asyncio.Task, log: logging.Logger, *,
                    within: float = STOP_WITHIN) -> bool:
    """Cancel ``task`` and wait for it to end, cancelling it again every 0.5 s, for at
    most ``within`` seconds. Returns whether it ended; one that did not is logged
    (``"task did not stop"``, with where it waits) and left behind.

    Cancelling the caller still cancels the caller (unlike awaiting the task inside
    ``suppress(CancelledError)``, which would swallow the caller's own cancellation)."""
    deadline = asyncio.get_running_loop().time() + within
    while not task.done():
        task.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.warning("task did not stop", extra={
                "task": task.get_name(), "within_s": within,
                "suspended_in": _suspended_in(task)})
            return False
        await asyncio.wait([task], timeout=min(0.5, left))
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved: no "exception was never retrieved" at exit
    return True


class Periodic:
    """Runs ``step`` every ``interval`` seconds in a task of its own. A step that fails
    (Redis or PostgreSQL away for a moment) is logged as ``"<what> failed"`` at
    ``level`` and tried again next round; only :meth:`stop` ends the loop."""

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[Any]],
                 log: logging.Logger, what: str, *, level: int = logging.WARNING) -> None:
        self.name = name
        self.interval = interval
        self.step = step
        self.log = log
        self.what = what
        self.level = level
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.log(self.level, "%s failed", self.what, exc_info=True)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, self.log)
            self._task = None


class Scheduled:
    """Runs ``step`` in a task of its own whenever it is due: ``step`` returns the
    seconds until it wants to run again (its next deadline; None when it knows of
    none), which is waited for at most ``max_wait`` (work another process made, which
    this one cannot be told of, is seen within that) and cut short by :meth:`wake`
    (this process made work that is due sooner). A step that fails is logged as
    ``"<what> failed"`` at ``level`` and tried again after ``retry`` seconds; only
    :meth:`stop` ends the loop.

    For loops with deadlines (closing auctions and giveaways): a fixed short period
    kept their promise only by polling ten times a second while nothing was due."""

    def __init__(self, name: str, step: Callable[[], Awaitable[float | None]],
                 log: logging.Logger, what: str, *, max_wait: float, retry: float,
                 level: int = logging.WARNING) -> None:
        self.name = name
        self.step = step
        self.log = log
        self.what = what
        self.max_wait = max_wait
        self.retry = retry
        self.level = level
        self.rounds = 0
        self._woken = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the step now (or as soon as the one running ends); nothing when the loop
        does not run in this process."""
        if self._task is not None:
            self._woken.set()

    async def _run(self) -> None:
        while True:
            self._woken.clear()  # a wake from here on runs the step again at once
            try:
                wait = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.log(self.level, "%s failed", self.what, exc_info=True)
                wait = self.retry
            self.rounds += 1
            wait = self.max_wait if wait is None else min(max(wait, 0.0), self.max_wait)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._woken.wait()
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, self.log)
            self._task = None
