"""dropserver/web.py: pages, static files, page config and the dev token endpoint,
against the real app on a real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import jwt
import pytest

from dropserver import web
from dropserver.settings import DEV_JWT_SECRET
from tests.conftest import start_server


@pytest.mark.parametrize("path, marker", [
    ("/", 'id="buy-overlay"'),
    ("/d/42", 'id="buy-overlay"'),
    ("/console", 'id="publish-btn"'),
])
async def test_pages_are_served_with_security_headers(http: httpx.AsyncClient, path: str,
                                                      marker: str) -> None:
    resp = await http.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert marker in resp.text
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self' https://js.stripe.com" in csp
    assert "object-src 'none'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    camera = "camera=(self)" if path == "/console" else "camera=()"
    assert camera in resp.headers["permissions-policy"]


async def test_non_numeric_drop_path_is_404(http: httpx.AsyncClient) -> None:
    resp = await http.get("/d/abc")
    assert resp.status_code == 404


async def test_static_scripts_and_styles(http: httpx.AsyncClient) -> None:
    js = await http.get("/static/js/viewer.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert "textContent" in js.text
    css = await http.get("/static/css/app.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


async def test_favicon_is_served(http: httpx.AsyncClient) -> None:
    """Browsers ask for /favicon.ico unless a page names its icon; both answer."""
    ico = await http.get("/favicon.ico")
    assert ico.status_code == 200
    assert ico.headers["content-type"] == "image/x-icon"
    assert ico.content[:4] == b"\x00\x00\x01\x00"  # ICONDIR, type 1 (icon)
    for page in ("/", "/console"):
        assert 'rel="icon" href="/static/img/favicon.svg"' in (await http.get(page)).text
    svg = await http.get("/static/img/favicon.svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"


@pytest.mark.parametrize("path", [
    "/static/package.json",
    "/static/build.mjs",
    "/static/tests/frames.test.js",
    "/static/node_modules/hls.js/package.json",
    "/static/js/../package.json",
    "/static/js/%2e%2e/package.json",
    "/static/js/../../pyproject.toml",
    "/static/js/nope.js",
    "/static/js",
])
async def test_only_public_folders_are_served(http: httpx.AsyncClient, path: str) -> None:
    resp = await http.get(path)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


async def test_hls_js_is_served_when_built(http: httpx.AsyncClient) -> None:
    if not (web.web_dir() / "dist" / "hls.mjs").is_file():
        pytest.skip("web/dist not built: run `npm ci && npm run build` in web/")
    resp = await http.get("/static/dist/hls.mjs")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/javascript")
    assert "export" in resp.text[-2000:]


async def test_config_names_gateway_and_no_secrets(http: httpx.AsyncClient) -> None:
    body = (await http.get("/v1/web/config")).json()
    assert body["dev"] is True
    assert body["payment_gateway"] == "fake"
    assert body["stripe_publishable_key"] == ""
    assert body["ws_path"] == "/ws"
    assert "{drop_id}" in body["hls_url_template"]
    assert "{drop_id}" in body["whip_url_template"]
    assert not any("secret" in k for k in body)


async def test_dev_token_issues_distinct_viewer_tokens(http: httpx.AsyncClient) -> None:
    first = await http.get("/v1/dev/token", params={"role": "viewer", "name": "Ann"})
    second = await http.get("/v1/dev/token")
    assert first.status_code == 200 and second.status_code == 200
    a, b = first.json(), second.json()
    assert a["user_id"] != b["user_id"]
    assert a["role"] == "viewer" and a["name"] == "Ann"
    assert first.headers["cache-control"] == "no-store"
    claims = jwt.decode(a["token"], DEV_JWT_SECRET, algorithms=["HS256"],
                        audience="dropserver")
    assert claims["sub"] == a["user_id"] and claims["role"] == "viewer"
    # and the server accepts it
    me = await http.get("/v1/me", headers={"authorization": f"Bearer {a['token']}"})
    assert me.json() == {"guest": False, "user_id": a["user_id"], "role": "viewer",
                         "name": "Ann", "avatar_url": "", "moderator_of": []}


@pytest.mark.parametrize("params, field", [
    ({"role": "creator"}, "role"),
    ({"role": "admin"}, "role"),
    ({"name": "<script>"}, "name"),
    ({"name": "x" * 41}, "name"),
])
async def test_dev_token_refuses_other_roles_and_bad_names(http: httpx.AsyncClient,
                                                           params: dict, field: str) -> None:
    resp = await http.get("/v1/dev/token", params=params)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"]["field"] == field


async def test_dev_token_is_404_outside_dev_mode(settings) -> None:
    # a load-test rig: not dev, fake payments allowed (/v1/dev/* mounted)
    prod = settings.replace(dev=False, jwt_secret="s" * 32, unsafe_fake_payments=True)
    running, stop = await start_server(prod)
    try:
        async with httpx.AsyncClient(base_url=running.base_url) as client:
            resp = await client.get("/v1/dev/token")
            assert resp.status_code == 404
            assert resp.json()["error"]["code"] == "not_found"
            config = (await client.get("/v1/web/config")).json()
            assert config["dev"] is False
            assert (await client.get("/")).status_code == 200
    finally:
        await stop()


def test_web_dir_prefers_the_repository_copy() -> None:
    """The checkout's own web/, not the copy a wheel packs as dropserver/web, whatever
    the checkout's folder is called (git clone names it "dropserver")."""
    d = web.web_dir()
    assert (d / "index.html").is_file()
    assert d == Path(__file__).resolve().parents[1] / "web"
    assert d != Path(web.__file__).resolve().parent / "web"


def test_web_component_is_mounted_last() -> None:
    from dropserver.app import COMPONENTS

    assert COMPONENTS[-1] is web.component


# --- the console's stats ------------------------------------------------------------

async def _selling_drop(http: httpx.AsyncClient, token: str) -> dict:
    auth = {"authorization": f"Bearer {token}"}
    resp = await http.post("/v1/drops", headers=auth, json={
        "title": "Stats drop", "products": [{"title": "Tee", "price": 2500, "units": 10}]})
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    from datetime import UTC, datetime, timedelta

    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    for path, body in (("schedule", {"starts_at": starts}), ("live", {}),
                       ("buy-now", {"product_id": drop["products"][0]["product_id"]})):
        r = await http.post(f"/v1/drops/{drop['id']}/{path}", headers=auth, json=body)
        assert r.status_code == 200, r.text
    return drop


async def test_stats_count_paid_orders_open_holds_and_remaining(
        http: httpx.AsyncClient, server, make_token) -> None:
    from checkout.defense import BuyLimits
    from checkout.reserve import BuyRequest, reserve

    token = make_token("creator-s", "creator")
    drop = await _selling_drop(http, token)
    drop_id, product_id = drop["id"], drop["products"][0]["product_id"]
    state = server.app.state
    hold = await reserve(state.redis, BuyRequest(drop_id, product_id, "buyer-1", "k1"),
                         hold_ttl_ms=60000, limits=BuyLimits())
    await state.db.execute(
        "INSERT INTO users (id) VALUES ('buyer-2') ON CONFLICT DO NOTHING")
    await state.db.execute(
        "INSERT INTO orders (public_id, drop_id, product_id, user_id, buyer_number, "
        "unit_price, amount, currency, idempotency_key, state, hold_expires_at, quantity) "
        "VALUES ('p1', $1, $2, 'buyer-2', 99, 2500, 5000, 'usd', 'k2', 'paid', now(), 2)",
        drop_id, product_id)
    resp = await http.get(f"/v1/drops/{drop_id}/stats",
                          headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["sold"] == 2 and body["orders"] == 1 and body["revenue"] == 5000
    assert body["open_holds"] == 1
    assert body["remaining"] == {str(product_id): hold.remaining}
    assert body["currency"] == "usd" and body["state"] == "selling"


async def test_stats_are_for_the_owner_only(http: httpx.AsyncClient, make_token) -> None:
    drop = await _selling_drop(http, make_token("creator-s", "creator"))
    path = f"/v1/drops/{drop['id']}/stats"
    assert (await http.get(path)).status_code == 401
    other = make_token("creator-x", "creator")
    resp = await http.get(path, headers={"authorization": f"Bearer {other}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_drop_owner"
    viewer = make_token("viewer-1", "viewer")
    resp = await http.get(path, headers={"authorization": f"Bearer {viewer}"})
    assert resp.status_code == 403
    resp = await http.get("/v1/drops/999999/stats",
                          headers={"authorization": f"Bearer {other}"})
    assert resp.status_code == 404
