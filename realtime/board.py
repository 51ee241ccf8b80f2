"""The node's fan-out board: which of the node's workers is writing a drop event.

The workers of one node (``dropserver serve --workers N``) share its cores. Each holds
its own viewers' commands while it fans a drop event out (realtime.dispatch), so that
every viewer of the worker sees BUY NOW before anyone's buy is taken. That alone was
not enough with 4 workers on 2 cores: the first worker done with BUY NOW released
its share of the rush (12,500 viewers, half of them buying within 200 ms, ~120 us of
CPU each) while the others were still writing BUY NOW, and those buys took the cores
their writes needed. At 50,000 viewers BUY NOW's p99 was 2.8x the bare broadcast
with no chat at all, where the same fan-out without buyers is 1.0x
(docs/benchmarks.md, "Chat storm"). So a worker also holds its viewers' commands
while another worker of its node is fanning a drop event out: the node's rush starts
when BUY NOW has left every worker.

The board is a small shared file the supervisor creates (``serve.run_supervisor``),
one 8-byte slot per worker, mapped by each worker: the ``time.monotonic()`` (one clock
for every process of the machine) until which that worker says it is fanning out. A
slot is a lease renewed by the worker's urgent slices, ``LEASE_S`` ahead: a worker
killed in the middle of a fan-out holds the others for at most that long. A single
worker (``--workers 1``, tests) has no board.
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ["BOARD_ENV", "INDEX_ENV", "LEASE_S", "FanoutBoard"]

BOARD_ENV = "DROPSERVER_FANOUT_BOARD"  # path of the board, set by the supervisor
INDEX_ENV = "DROPSERVER_WORKER_INDEX"  # this worker's slot
LEASE_S = 0.25  # a slot says "busy" this long after the worker's last urgent slice
_SLOT = struct.Struct("d")


class FanoutBoard:
    """One worker's view of its node's board (see the module docstring)."""

    def __init__(self, path: str, index: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slots = size // _SLOT.size
        if not 0 <= index < slots:
            raise ValueError(f"worker slot {index} is not on a board of {slots}")
        self.index = index
        self._mine = index * _SLOT.size
        self._others = tuple(i * _SLOT.size for i in range(slots) if i != index)
        self._until = 0.0  # the lease last written to our slot

    @staticmethod
    def create(path: str, workers: int) -> None:
        """A board for ``workers`` workers, every slot idle."""
        with open(path, "wb") as f:
            f.write(bytes(_SLOT.size * workers))

    @classmethod
    def from_env(cls) -> FanoutBoard | None:
        """The board the supervisor gave this worker, if any."""
        path, index = os.environ.get(BOARD_ENV), os.environ.get(INDEX_ENV)
        if not path or index is None:
            return None
        return cls(path, int(index))

    def busy(self, now: float) -> None:
        """This worker is fanning out a drop event at ``now`` (monotonic). Written only
        when the lease has less than half of itself left: one store per ~0.1 s."""
        if self._until - now < LEASE_S / 2:
            self._until = now + LEASE_S
            _SLOT.pack_into(self._map, self._mine, self._until)

    def idle(self) -> None:
        """This worker's drop events are out."""
        if self._until:
            self._until = 0.0
            _SLOT.pack_into(self._map, self._mine, 0.0)

    def others_busy(self, now: float) -> bool:
        """Another worker of the node is fanning out a drop event."""
        m = self._map
        for offset in self._others:
            if _SLOT.unpack_from(m, offset)[0] > now:
                return True
        return False

    def close(self) -> None:
        self.idle()
        self._map.close()
