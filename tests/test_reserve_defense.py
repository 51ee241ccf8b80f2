"""checkout/defense.py: the verifier hook and the limits handed to reserve.lua."""

from __future__ import annotations

import pytest

from checkout import defense
from checkout.defense import AcceptAll, BuyAttempt, BuyLimits, RejectAll, load_verifier
from dropserver.errors import ApiError
from dropserver.settings import load_settings

ATTEMPT = BuyAttempt("u1", 1, 2, "10.0.0.1", proof="tok")


async def test_default_accepts_and_reject_all_refuses_with_a_code():
    assert isinstance(load_verifier(""), AcceptAll)
    await defense.check(load_verifier(""), ATTEMPT)
    with pytest.raises(ApiError) as err:
        await defense.check(load_verifier("checkout.defense:RejectAll"), ATTEMPT)
    assert err.value.code == "captcha_required" and err.value.status == 403


class TokenVerifier:
    """A verifier that wants a proof: what a captcha integration looks like."""

    async def verify(self, attempt: BuyAttempt) -> bool:
        return attempt.proof == "tok"


async def test_a_custom_verifier_sees_the_attempt():
    v = load_verifier("tests.test_reserve_defense:TokenVerifier")
    await defense.check(v, ATTEMPT)
    with pytest.raises(ApiError):
        await defense.check(v, BuyAttempt("u1", 1, 2, "10.0.0.1"))


def test_bad_verifier_paths():
    with pytest.raises(ValueError):
        load_verifier("checkout.defense")
    with pytest.raises(ValueError):
        load_verifier("checkout.defense:BuyLimits")  # no verify method
    with pytest.raises(ModuleNotFoundError):
        load_verifier("no.such.module:X")
    assert isinstance(load_verifier("checkout.defense:RejectAll"), RejectAll)


def test_limits_come_from_settings():
    s = load_settings({"DROPSERVER_BUY_RATE_USER": "3", "DROPSERVER_BUY_RATE_IP": "0",
                       "DROPSERVER_BUY_VELOCITY_WINDOW_MS": "500",
                       "DROPSERVER_BUY_VELOCITY_MAX": "2"}, dev=True)
    limits = BuyLimits.from_settings(s)
    assert limits.script_args() == [10_000, 3, 0, 500, 2]
