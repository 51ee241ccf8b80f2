"""The viewer of the bare-broadcast floor (:mod:`loadtest.floor`), and what a swarm of
them reports.

A floor viewer joins nothing: it connects, then times each numbered message the floor
server broadcasts (``data.k``). The swarm drives it through the same calls as a
:class:`loadtest.viewer.Viewer` (``connecting``, ``opened``, ``received``, ``closed``,
``count_into``), so one swarm process serves both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from loadtest.viewer import Phase, UndecodableFrame, decode_shared

__all__ = ["FloorViewer", "summarize_floor"]


class FloorViewer:
    """A viewer of the bare-broadcast floor (loadtest.floor): it joins nothing and
    times each numbered message the floor server broadcasts (``data.k``)."""

    __slots__ = ("arrivals", "index", "phase")

    def __init__(self, index: int) -> None:
        self.index = index
        self.phase = Phase.IDLE
        self.arrivals: list[tuple[int, float]] = []

    @property
    def is_open(self) -> bool:
        return self.phase is Phase.JOINED

    is_joined = is_open

    def connecting(self, now: float) -> None:
        self.phase = Phase.CONNECTING

    def opened(self, now: float) -> list[dict[str, Any]]:
        self.phase = Phase.JOINED  # connected is all the floor asks
        return []

    def closed(self, code: int | None, reason: str, now: float) -> None:
        self.phase = Phase.CLOSED

    def received(self, data: bytes | str, now: float) -> list[tuple[float, dict[str, Any]]]:
        try:
            messages = decode_shared(data)  # as the rehearsal's viewers read
        except UndecodableFrame:
            return []
        for message in messages:
            k = (message.get("data") or {}).get("k")
            if isinstance(k, int):
                self.arrivals.append((k, round(now, 4)))
        return []

    def count_into(self, counts: Counter[str]) -> None:
        counts[self.phase.value] += 1
        if self.phase is Phase.JOINED:
            counts["ever_joined"] += 1
        counts["floor_seen"] += len(self.arrivals)


def summarize_floor(viewers: Iterable[FloorViewer]) -> dict[str, Any]:
    """Arrival times by message number ``k``."""
    arrivals: dict[str, list[float]] = {}
    joined = 0
    for v in viewers:
        joined += 1 if v.phase is Phase.JOINED else 0
        for k, t in v.arrivals:
            arrivals.setdefault(str(k), []).append(t)
    return {"floor_arrivals": arrivals, "totals": {"joined": joined}}
