"""Faults injected for real while a drop sells (tests/fault_rig.py): PostgreSQL
stopped, Redis restarted empty, a server worker SIGKILLed, an order worker SIGKILLed
between the charge and the commit. After each: every invariant of tests/invariants.py,
and every buyer heard their order's outcome once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fault_rig import Rig, run_fault


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with Rig(workers=2, hold_ttl=120) as r:
        yield r


def _assert_ok(report) -> None:
    assert report.holds > 0, report.summary()
    assert report.ok, report.summary()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_postgres_down_5s_loses_no_hold(rig) -> None:
    report = await run_fault(rig, "postgres_down", outage=5.0, seed=1)
    _assert_ok(report)
    assert report.dead_letters == 0, report.summary()
    assert report.timings["first_order_row_after_return_s"] < 2.0, report.summary()
