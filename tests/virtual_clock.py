"""A virtual clock for the running event loop: time moves only when the test moves it.

A test that times code against wall-clock deadlines ("it gave up within 2 s") fails on
a loaded machine, where the process can sit descheduled for seconds between two lines.
Under :func:`virtual_clock` the loop's ``time()`` (which ``asyncio.sleep``,
``wait_for``, ``asyncio.timeout`` and every ``call_later`` read) is frozen; the test
moves it forward a step at a time, letting the loop run everything that became ready
after each step, and reads *when* (in loop time) a thing happened. How busy the machine
is changes how long the test takes, never what it sees.

Real I/O still runs while the clock stands still: the loop polls its sockets as usual.
A test whose code waits on real I/O (a server's shutdown) passes ``real_wait``, a short
real pause per step during which the loop serves its sockets, so the clock does not run
ahead of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

__all__ = ["VirtualClock", "virtual_clock"]


class VirtualClock:
    """The loop's clock: ``now`` starts at the loop's real time and moves in steps."""

    def __init__(self, start: float, step: float = 0.01, turns: int = 20) -> None:
        self.start = start
        self.step = step
        self.turns = turns  # loop turns run after each step (a chain of wake-ups)
        self._steps = 0

    def time(self) -> float:
        return self.start + self._steps * self.step

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock was installed."""
        return self._steps * self.step

    async def settle(self, real_wait: float = 0.0) -> None:
        """Let the loop run what is ready (and, with ``real_wait``, serve its sockets
        for that many real seconds) without moving the clock."""
        for _ in range(self.turns):
            await asyncio.sleep(0)
        if real_wait > 0:
            # a real pause that needs no loop timer (they all read the frozen clock)
            await asyncio.get_running_loop().run_in_executor(None, time.sleep, real_wait)
            for _ in range(self.turns):
                await asyncio.sleep(0)

    async def advance(self, seconds: float, *, real_wait: float = 0.0) -> None:
        """Move the clock ``seconds`` forward, a step at a time, settling after each."""
        for _ in range(round(seconds / self.step)):
            self._steps += 1
            await self.settle(real_wait)

    async def run_until(self, done: Callable[[], bool], *, limit: float,
                        real_wait: float = 0.0) -> float | None:
        """Move the clock until ``done()``; the virtual seconds that took (from now),
        or None if it was still not done ``limit`` virtual seconds on."""
        began = self._steps
        await self.settle(real_wait)
        while not done():
            if (self._steps - began) * self.step >= limit:
                return None
            self._steps += 1
            await self.settle(real_wait)
        return (self._steps - began) * self.step


@contextlib.contextmanager
def virtual_clock(step: float = 0.01) -> Iterator[VirtualClock]:
    """Freeze the running loop's clock for the block; the test moves it."""
    loop = asyncio.get_running_loop()
    clock = VirtualClock(loop.time(), step)
    real_time = loop.time
    loop.time = clock.time  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        # Timers set under the clock keep their virtual deadlines; at most the
        # virtual time the test moved separates them from the real clock.
        loop.time = real_time  # type: ignore[method-assign]
