"""A fault in the middle of a rehearsal, and how its viewers came back from it.

``rehearse --fault CMD --fault-after S`` runs the shell command ``CMD`` ``S`` seconds
after the creator's BUY NOW request was answered, in the rush: for example
``python -m loadtest cluster kill node2`` (SIGKILL one node of the cluster harness) or
``python -m loadtest cluster drain node2`` (SIGTERM: its viewers get ``going_away``);
the fault's time is when the command started, or the ``monotonic=<seconds>`` it prints
(both cluster commands do). In Python, :class:`Fault` takes a callable instead. The
rehearsal then waits until every viewer whose socket closed is joined again before it
ends the drop.

Each viewer times its own outage (loadtest.viewer): from the moment its socket
closed to the ``joined`` answer of its rejoin, which carries every missed event
(``recovered: true``) or a snapshot. Either way the viewer is caught up at that
moment: the answer brings it to the drop's newest position and what follows comes
live. A buy left unanswered by the lost socket is sent again with its idempotency key
(the server answers the first reply again). :func:`recovery` sums that up: viewers
lost, back, still down, recovered from history or from a snapshot, told by
``going_away`` or not, and the time from the fault to the last viewer back;
:func:`judge` fails the run when a viewer is not back within the budget.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtest.stats import summarize

__all__ = ["Fault", "judge", "recovery"]

# A command may print when it struck, in the machine's CLOCK_MONOTONIC (shared by all
# its processes): ``python -m loadtest cluster kill`` prints ``monotonic=<seconds>``.
_MONOTONIC = re.compile(r"monotonic=(\d+(?:\.\d+)?)")


@dataclass
class Fault:
    after_s: float = 0.5  # seconds after the creator's BUY NOW was answered
    command: str = ""  # a shell command, or:
    # or a callable, run in a thread; a float it returns is the monotonic time the fault
    # struck (Cluster.kill_node's), else the time it was called counts
    action: Callable[[], Any] | None = None
    budget_s: float = 10.0  # every lost viewer back within this, from the fault

    def describe(self) -> str:
        return self.command or getattr(self.action, "__name__", repr(self.action))

    async def run(self, since: float) -> dict[str, Any]:
        """Wait until ``since + after_s`` (monotonic), inject, say what happened."""
        await asyncio.sleep(max(0.0, since + self.after_s - time.monotonic()))
        at = time.monotonic()
        record: dict[str, Any] = {"what": self.describe(), "at": at, "exit": 0, "output": ""}
        try:
            if self.command:
                proc = await asyncio.create_subprocess_shell(
                    self.command, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
                record["exit"] = proc.returncode
                record["output"] = out.decode(errors="replace")[-2000:]
                struck = _MONOTONIC.search(record["output"])
                if struck:  # the command says when it struck (cluster kill/drain do)
                    record["at"] = at = float(struck.group(1))
            elif self.action is not None:
                done = await asyncio.to_thread(self.action)
                if isinstance(done, float):  # the action says when it struck
                    record["at"] = at = done
        except Exception as exc:  # reported, and judged: the fault did not happen
            record["exit"] = -1
            record["output"] = f"{type(exc).__name__}: {exc}"[:2000]
        # When the command or action returned: a drain returns once its node has
        # exited, so every socket it will close is closed by then.
        record["done"] = time.monotonic()
        record["took_s"] = round(record["done"] - at, 3)
        return record


def recovery(reports: list[dict[str, Any]], record: dict[str, Any],
             budget_s: float, t0: float) -> dict[str, Any]:
    """The viewers' outages that began at or after the fault, summed up. ``t0``: the
    rehearsal's start (times in the report are seconds from it)."""
    at = record["at"]
    outages = [o for r in reports for o in r.get("outages", ()) if o[0] >= at - 0.05]
    still_down = sum(int(r["totals"].get("down_at_report", 0)) for r in reports)
    back_after = [b - at for _, b, _, _ in outages]
    return {
        "what": record["what"], "at_s": round(at - t0, 3), "exit": record["exit"],
        "output": record["output"], "took_s": record["took_s"], "budget_s": budget_s,
        "outages": len(outages), "still_down": still_down,
        "recovered": sum(1 for o in outages if o[2]),
        "snapshot": sum(1 for o in outages if not o[2]),
        "announced": sum(1 for o in outages if o[3]),
        "last_back_s": round(max(back_after), 3) if back_after else None,
        "back_after_fault": summarize(back_after),
        "outage": summarize([b - a for a, b, _, _ in outages]),
        "buy_retries": sum(int(r["totals"].get("buy_retries", 0)) for r in reports),
    }


def judge(rec: dict[str, Any]) -> list[str]:
    """What failed: the fault itself, a viewer not back, or back too late."""
    fail = []
    if rec["exit"] != 0:
        fail.append(f"the fault `{rec['what']}` failed (exit {rec['exit']}): "
                    f"{rec['output'][-300:]}")
    elif rec["outages"] == 0:
        fail.append(f"the fault `{rec['what']}` closed no viewer's socket")
    if rec["still_down"]:
        fail.append(f"{rec['still_down']} viewers never came back after the fault")
    last = rec["last_back_s"]
    if last is not None and last > rec["budget_s"]:
        fail.append(f"the last viewer was back {last:.1f} s after the fault, over the "
                    f"{rec['budget_s']:.0f} s budget")
    return fail
