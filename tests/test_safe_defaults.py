"""Production is safe by default: outside `dropserver dev` no fake payments and no
/v1/dev/* routes unless a setting whose name says "unsafe" turns them on."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from dropserver.settings import SettingsError, load_settings
from tests.conftest import start_server

# What docs/operations.md used to call the whole of production's required settings.
_ONLY_DOCUMENTED = {"REDIS_URL": "redis://127.0.0.1:1/0",
                    "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                    "DROPSERVER_JWT_SECRET": "s" * 32}


def _serve(extra: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DROPSERVER_", "STRIPE_", "REDIS_URL", "DATABASE_URL"))}
    env.update(_ONLY_DOCUMENTED)
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "dropserver.cli", "serve", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_serve_with_only_the_documented_settings_refuses_and_names_what_to_set():
    out = _serve({})
    assert out.returncode == 2, out.stderr
    assert "STRIPE_API_KEY" in out.stderr
    assert "DROPSERVER_UNSAFE_FAKE_PAYMENTS=1" in out.stderr


def test_serve_refuses_the_fake_gateway_unless_the_unsafe_setting_is_on():
    out = _serve({"DROPSERVER_PAYMENT_GATEWAY": "fake"})
    assert out.returncode == 2
    assert "DROPSERVER_PAYMENT_GATEWAY" in out.stderr
    assert "DROPSERVER_UNSAFE_FAKE_PAYMENTS=1" in out.stderr


def test_serve_refuses_dev_mode():
    """DROPSERVER_DEV signs tokens with a published secret and opens /v1/dev/*: it is
    what `dropserver dev` runs with, never `serve`."""
    out = _serve({"DROPSERVER_DEV": "1"})
    assert out.returncode == 2
    assert "DROPSERVER_DEV" in out.stderr and "dropserver dev" in out.stderr


def test_settings_outside_dev_default_to_stripe_and_need_its_secrets():
    with pytest.raises(SettingsError) as info:
        load_settings({"DROPSERVER_JWT_SECRET": "x"})
    assert info.value.variable == "STRIPE_API_KEY"
    with pytest.raises(SettingsError) as info:
        load_settings({"DROPSERVER_JWT_SECRET": "x", "STRIPE_API_KEY": "sk_live_x"})
    assert info.value.variable == "STRIPE_WEBHOOK_SECRET"
    s = load_settings({"DROPSERVER_JWT_SECRET": "x", "STRIPE_API_KEY": "sk_live_x",
                       "STRIPE_WEBHOOK_SECRET": "whsec_x"})
    assert s.payment_gateway == "stripe"
    assert load_settings({}, dev=True).payment_gateway == "fake"
    unsafe = load_settings({"DROPSERVER_JWT_SECRET": "x",
                            "DROPSERVER_UNSAFE_FAKE_PAYMENTS": "1"})
    assert unsafe.payment_gateway == "fake"
    with pytest.raises(SettingsError) as info:
        load_settings({"DROPSERVER_JWT_SECRET": "x", "DROPSERVER_PAYMENT_GATEWAY": "stripe",
                       "STRIPE_API_KEY": "sk_live_x", "STRIPE_WEBHOOK_SECRET": "whsec_x",
                       "DROPSERVER_UNSAFE_FAKE_PAYMENTS": "1"})
    assert info.value.variable == "DROPSERVER_UNSAFE_FAKE_PAYMENTS"


async def test_the_app_refuses_a_fake_gateway_it_was_not_allowed(settings):
    """However the settings were built (replace() skips validation), the app does not
    start with fake payments outside dev without the unsafe setting."""
    from dropserver.app import create_app

    prod = settings.replace(dev=False, jwt_secret="s" * 32, payment_gateway="fake")
    with pytest.raises(SettingsError, match="DROPSERVER_UNSAFE_FAKE_PAYMENTS"):
        create_app(prod)


async def test_production_has_no_dev_routes(settings):
    prod = settings.replace(dev=False, jwt_secret="s" * 32, payment_gateway="stripe",
                            stripe_api_key="sk_test_x", stripe_webhook_secret="whsec_x",
                            stripe_api_base="http://127.0.0.1:1")
    srv, stop = await start_server(prod)
    try:
        paths = {getattr(r, "path", "") for r in srv.app.routes}
        assert not [p for p in paths if p.startswith("/v1/dev/")]
        async with httpx.AsyncClient(base_url=srv.base_url) as client:
            resp = await client.post("/v1/dev/orders/1-1-abc/confirm", json={})
            assert resp.status_code == 404
            assert (await client.get("/v1/dev/token")).status_code == 404
    finally:
        await stop()


async def test_unsafe_fake_payments_opens_only_the_confirm_route(settings):
    rig = settings.replace(dev=False, jwt_secret="s" * 32, unsafe_fake_payments=True)
    srv, stop = await start_server(rig)
    try:
        assert srv.app.state.payments_gateway.name == "fake"
        async with httpx.AsyncClient(base_url=srv.base_url) as client:
            resp = await client.post("/v1/dev/orders/1-1-abc/confirm", json={})
            assert resp.status_code == 401  # the route exists: it wants the buyer
            assert (await client.get("/v1/dev/token")).status_code == 404
    finally:
        await stop()
