"""Background loops: a step run every few seconds until the process stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Periodic"]


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
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
