"""Compensations: undo an order that cannot go through, one step at a time.

When an order stream entry is given up (:mod:`checkout.dead_letters`: malformed, refused
by the rules, or failing with something that is not an outage), its order must still
end cleanly. Four steps, in this order, each idempotent and run on its own:

1. **fail the order** -- its ``orders`` row exists (recorded from the entry, or from
   Redis' hold record, so an acknowledged hold always has one) and moves to ``failed``
   unless it already ended;
2. **cancel or refund the payment** -- an intent of a failed order is cancelled, or
   refunded (and the refund recorded) when it had succeeded;
3. **release the hold** -- its units go back to stock (``release.lua``: a no-op unless
   the hold is still held);
4. **tell the buyer** -- ``order.failed`` (``reason: processing_error``), once.

Each step is retried for as long as an outage lasts (:func:`checkout.retry.until_done`),
so a PostgreSQL or Redis blink never skips the steps after it; a step failing for any
other reason is logged and counted (``dropserver_order_compensation_failures_total``)
and the next step still runs. What a step could not do, the reconciler
(:mod:`checkout.reconcile`) finds and repairs later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import Counter

from checkout.order_entries import BadEntry, ReserveEntry, parse_entry
from checkout.order_states import RELEASED_STATES, OrderState
from checkout.orders import OrderProcessor, release_hold
from checkout.retry import until_done

__all__ = ["fail_order", "step"]

log = logging.getLogger("dropserver.orders")

COMPENSATION_FAILURES = Counter(
    "dropserver_order_compensation_failures_total",
    "Compensating steps that failed with something other than an outage", ["step"])

T = TypeVar("T")


async def step(what: str, fn: Callable[[], Awaitable[T]], *,
               extra: dict | None = None) -> T | None:
    """Run one compensating step until done (outages retried); any other failure is
    logged and counted, and None returned so the next step still runs."""
    try:
        return await until_done(fn, what=what, log=log, extra=extra)
    except Exception:
        COMPENSATION_FAILURES.labels(what).inc()
        log.exception("compensation step failed: %s", what, extra=extra)
        return None


async def fail_order(proc: OrderProcessor, fields: Mapping[str, str]) -> None:
    """Steps 1-4 for the reserve entry ``fields`` (text, possibly malformed)."""
    hold_id = fields.get("hold_id", "")
    user_id = fields.get("user_id", "")
    extra = {"hold_id": hold_id}
    try:
        entry: ReserveEntry | None = parse_entry(fields)  # type: ignore[assignment]
        if not isinstance(entry, ReserveEntry):
            entry = None
    except BadEntry:
        entry = None

    async def record() -> Any:
        order = await proc.order(hold_id)
        if order is None and entry is not None:
            order = await proc.record_order(entry)
        if order is None:
            from checkout import holds

            held = await holds.get_hold(proc.redis, hold_id)
            if held is not None:
                order = await proc.record_order(held)
        return order

    order = await step("fail the order", record, extra=extra)
    if order is not None:
        await step("fail the order", lambda: proc.move(order, OrderState.FAILED),
                   extra=extra)
        await step("cancel or refund the payment", lambda: proc.undo_payment(order),
                   extra=extra)

        async def release_if_released() -> None:
            state, released = await proc.state_of(order["id"])
            if state in RELEASED_STATES or released:
                await release_hold(proc.redis, hold_id, released or state)

        await step("release the hold", release_if_released, extra=extra)
        await step("tell the buyer", lambda: proc.tell(order), extra=extra)
        return
    # Nothing to record the order from (a malformed entry whose hold is gone).
    await step("release the hold", lambda: release_hold(proc.redis, hold_id, "failed"),
               extra=extra)
    if user_id:
        await step("tell the buyer", lambda: proc.notify(proc.redis, user_id, "order.failed", {
            "order_id": hold_id, "reason": "processing_error",
            "message": "the order could not be processed"}), extra=extra)
