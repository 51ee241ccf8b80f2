"""Dead letters: order stream entries the pipeline gives up on, parked for a person.

An entry goes to the stream ``orders:dead`` when it can never be processed: it is
malformed, the rules refuse it (an off-session order without a saved card, a campaign
authorization that could lapse before its capture), or it keeps failing with something
that is *not* an outage (a bug). An outage -- PostgreSQL or Redis away, the gateway
answering 5xx -- never dead-letters an entry: the worker waits it out
(:mod:`checkout.order_worker`).

Parking an entry (fields: ``stream``, ``entry_id``, ``reason``, ``error``, ``fields`` as
JSON, ``at``; counted by ``dropserver_order_dead_letters_total{reason}``) then runs the
compensations (:func:`checkout.compensations.fail_order`) for a reserve entry, and
acknowledges the entry last: a worker that dies half-way leaves it pending, and the
next one parks it again (at least once) and re-runs every step (idempotent).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter

from checkout.compensations import fail_order
from checkout.order_entries import fields_text
from checkout.orders import OrderProcessor
from checkout.retry import until_done

__all__ = ["DEAD_LETTERS", "DEAD_LETTER_MAXLEN", "DEAD_LETTER_STREAM", "dead_letter"]

log = logging.getLogger("dropserver.orders")

DEAD_LETTER_STREAM = "orders:dead"
DEAD_LETTER_MAXLEN = 100_000

DEAD_LETTERS = Counter("dropserver_order_dead_letters_total",
                       "Order stream entries moved to the dead-letter stream", ["reason"])


async def dead_letter(proc: OrderProcessor, stream: str, entry_id: Any, fields: Mapping,
                      reason: str, error: str) -> None:
    """Park the entry, then compensate (reserve entries). The caller acknowledges."""
    f = fields_text(fields)
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    extra = {"stream": stream, "entry_id": eid, "reason": reason, "error": error[:500],
             "hold_id": f.get("hold_id")}
    log.error("order entry dead-lettered", extra=extra)
    record = {"stream": stream, "entry_id": eid, "reason": reason, "error": error[:2000],
              "fields": json.dumps(f), "at": str(int(time.time() * 1000))}
    await until_done(lambda: proc.redis.xadd(DEAD_LETTER_STREAM, record,
                                             maxlen=DEAD_LETTER_MAXLEN, approximate=True),
                     what="park the dead letter", log=log, extra=extra)
    DEAD_LETTERS.labels(reason).inc()
    if f.get("type") == "reserve" and f.get("hold_id"):
        await fail_order(proc, f)
