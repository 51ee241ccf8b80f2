"""Which failures are outages, and how the order pipeline waits them out.

An *outage* is an error that says nothing about the work itself: PostgreSQL or Redis
refused, reset or dropped the connection, is shutting down or starting up
(``AdminShutdownError``, ``CannotConnectNowError``), has too many connections, timed
out, is loading or read-only after a failover; the gateway answered 429, 5xx or not at
all. The same request succeeds once the outage ends, so the pipeline retries it with
exponential backoff and full jitter, capped low enough that the first write after the
outage happens within about a second. Anything else (a refused request, a bug) is not
retried forever.

:func:`is_outage` classifies (the one classifier, :func:`dropserver.errors.is_outage`,
which HTTP's 503 uses too; a :class:`~checkout.payment_types.GatewayError` says itself
whether it is retryable), :func:`backoff` spaces the tries, :func:`until_done` runs
one idempotent step until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dropserver.errors import is_outage

__all__ = ["NotYet", "backoff", "is_outage", "until_done"]

T = TypeVar("T")


class NotYet(Exception):
    """Something this step depends on has not happened yet: try again later."""

    retryable = True  # an outage to dropserver.errors.is_outage


def backoff(attempt: int, *, base: float = 0.1, cap: float = 1.0) -> float:
    """Seconds before retry ``attempt`` (0-based): exponential with full jitter.

    The cap is low on purpose: a few hundred waiting entries retrying once a second
    cost nothing, and the first one through after an outage is never more than about
    a second late."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


async def until_done(step: Callable[[], Awaitable[T]], *, what: str,
                     log: logging.Logger, extra: dict | None = None,
                     on_retry: Callable[[], None] | None = None) -> T:
    """Run the idempotent ``step`` until it returns, retrying outages for as long as
    they last (logged on the first retry and then once a minute). Any other error is
    raised at once."""
    attempt = 0
    first = last_log = 0.0
    while True:
        try:
            return await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_outage(exc):
                raise
            now = time.monotonic()
            if attempt == 0 or now - last_log >= 60:
                first = first or now
                last_log = now
                log.warning("%s: outage, retrying", what, extra={
                    **(extra or {}), "attempt": attempt + 1,
                    "seconds": round(now - first, 1),
                    "error": f"{type(exc).__name__}: {exc}"[:300]})
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(backoff(attempt))
            attempt += 1
