"""checkout/retry.py: which failures are outages (waited out) and which are not."""

from __future__ import annotations

import logging

import asyncpg
import pytest
from redis import exceptions as redis_errors

from checkout.payment_types import GatewayError
from checkout.retry import NotYet, backoff, is_outage, until_done


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"),
    TimeoutError(), NotYet("order not recorded yet"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"),
    asyncpg.CrashShutdownError("crash"), asyncpg.QueryCanceledError("statement timeout"),
    asyncpg.SerializationError("could not serialize"),
    asyncpg.DeadlockDetectedError("deadlock"),
    asyncpg.InterfaceError("connection is closed"),
    redis_errors.ConnectionError("Error 111 connecting"), redis_errors.TimeoutError(),
    redis_errors.BusyLoadingError("LOADING"), redis_errors.ReadOnlyError("READONLY"),
    redis_errors.TryAgainError("TRYAGAIN"), redis_errors.MasterDownError("MASTERDOWN"),
    GatewayError("503", code="unavailable", retryable=True),
])
def test_outages(exc) -> None:
    assert is_outage(exc)


@pytest.mark.parametrize("exc", [
    ValueError("bug"), KeyError("x"), asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.DataError("invalid input"), redis_errors.ResponseError("WRONGTYPE"),
    GatewayError("no such intent", code="resource_missing"),
    GatewayError("idempotency", code="idempotency_error"),
])
def test_not_outages(exc) -> None:
    assert not is_outage(exc)


def test_backoff_is_capped_and_jittered() -> None:
    waits = [backoff(a) for a in range(40)]
    assert all(0 <= w <= 1.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 30


async def test_until_done_waits_out_an_outage_and_raises_anything_else() -> None:
    log = logging.getLogger("test")
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError(111, "refused")
        return "done"

    assert await until_done(flaky, what="flaky", log=log) == "done"
    assert len(calls) == 4

    async def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await until_done(broken, what="broken", log=log)


def test_one_classifier_for_http_and_the_order_pipeline() -> None:
    """HTTP's 503 and the pipeline's retries ask the same question the same way."""
    from dropserver import errors

    assert is_outage is errors.is_outage
    assert errors.is_outage(asyncpg.SerializationError("could not serialize"))
    assert errors.is_outage(redis_errors.ReadOnlyError("READONLY"))
    assert not errors.is_outage(FileNotFoundError(2, "no such file"))
