"""The rehearsal's end of its swarm processes: where each connects from, one pipe
each, and what they say.

A rehearsal (:mod:`loadtest.rehearse`) starts each swarm (:mod:`loadtest.swarm`) as
``python -m loadtest swarm`` with a JSON config line on stdin; the swarm answers with
JSON lines on stdout: ``progress`` twice a second, and a ``report`` when asked.
:func:`sources` spreads the swarms over loopback source addresses (or the given ones),
:class:`SwarmProc` is one process and its stdin, :func:`read_swarm` files its lines
into :class:`Progress`, and :func:`die_with_parent` ends a swarm with its rehearsal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loadtest.swarm import SwarmConfig

if TYPE_CHECKING:
    from loadtest.rehearse import RehearsalConfig

__all__ = ["Progress", "SwarmProc", "die_with_parent", "read_swarm", "sources"]


def sources(cfg: RehearsalConfig, index: int, swarms: int, count: int) -> list[str]:
    """Source addresses for swarm ``index``: explicit ones round-robin, or 127.0.0.x."""
    if cfg.source_addresses:
        return cfg.source_addresses[index::swarms] or cfg.source_addresses
    if cfg.target and not cfg.target.startswith(("http://127.", "http://localhost")):
        return []
    need = max(1, math.ceil(count / cfg.per_address))
    # 127.0.0.2, 127.0.0.3, ...: never 127.0.0.1, where the server listens.
    return [f"127.0.{k // 250}.{k % 250 + 2}"
            for k in range(index * need, (index + 1) * need)]


class Progress:
    """Latest progress line of every swarm, and the timeline of their sum."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}
        self.reports: dict[int, dict[str, Any]] = {}
        self.events: dict[int, asyncio.Event] = {}
        # Each swarm's answer to its last chat_rate: the chat it had sent by then.
        self.chat_acks: dict[int, dict[str, Any]] = {}

    def total(self, key: str) -> int:
        return sum(int(p.get(key, 0)) for p in self.latest.values())


@dataclass
class SwarmProc:
    index: int
    proc: asyncio.subprocess.Process
    config: SwarmConfig
    reader: asyncio.Task | None = None

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            await self.proc.stdin.drain()


async def read_swarm(sp: SwarmProc, progress: Progress) -> None:
    assert sp.proc.stdout is not None
    while True:
        line = await sp.proc.stdout.readline()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        kind = msg.get("type")
        if kind == "progress":
            progress.latest[sp.index] = msg
        elif kind == "chat_rate":
            progress.chat_acks[sp.index] = msg
        elif kind == "report":
            progress.reports[sp.index] = msg
            progress.events[sp.index].set()


def die_with_parent() -> None:
    """A swarm process's ``preexec_fn``: SIGKILLed when the rehearsal goes away."""
    from loadtest.target import die_with_parent as hook

    hook(signal.SIGKILL)()
