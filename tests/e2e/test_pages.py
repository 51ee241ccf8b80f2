"""Both pages in headless Chromium against the real server: they load without an
error or a failed load (tests/e2e/conftest.py checks every page), fit a phone, the
viewer gets a dev token, the console signs in and shows the fake camera."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop


async def test_viewer_page_fits_a_phone_and_gets_a_dev_token(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    drop = await api_drop(http, make_token("creator-1", "creator"))
    page = await browsers.page("viewer", phone=True)
    await page.goto(f"{server.base_url}/d/{drop['id']}")
    await page.wait_for_function("() => window.__dropState !== undefined")
    token = await page.evaluate("localStorage.getItem('dropserver.viewer_token')")
    assert token and token.count(".") == 2, "viewer got a token from /v1/dev/token"
    # the connection state is visible and has a known value
    conn = page.locator("#conn")
    assert await conn.is_visible()
    assert await conn.get_attribute("data-state") in (
        "connecting", "open", "reconnecting", "closed")
    # nothing overflows a 390 px wide screen
    widths = await page.evaluate(
        "() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths
    assert await page.locator("#video").is_visible()
    await page.locator("#chat-form").wait_for(state="visible")
    await browsers.shot(page, "viewer-phone")


async def test_viewer_page_without_drop_lists_live_drops_and_asks_for_one(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    auth = {"authorization": f"Bearer {make_token('creator-1', 'creator')}"}
    drop = (await http.post("/v1/drops", headers=auth, json={
        "title": "<b>On air</b>", "products": [{"title": "T", "price": 100, "units": 1}],
        "starts_at": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()})).json()
    for step in ("schedule", "live"):
        resp = await http.post(f"/v1/drops/{drop['id']}/{step}", headers=auth, json={})
        assert resp.status_code == 200, resp.text
    page = await browsers.page("viewer", phone=True)
    await page.goto(f"{server.base_url}/")
    link = page.locator("#live-drops-list a")
    await link.wait_for()
    assert await link.text_content() == "<b>On air</b>"
    assert await link.get_attribute("href") == f"/d/{drop['id']}"
    await browsers.shot(page, "viewer-home")
    await page.locator("#pick-drop").wait_for(state="visible")
    await page.fill("#pick-drop-id", str(drop["id"]))
    await page.click("#pick-drop button")
    await page.wait_for_url(f"**/d/{drop['id']}")


async def test_console_signs_in_from_fragment_and_previews_the_camera(
        server: RunningServer, browsers: Browsers, make_token) -> None:
    page = await browsers.page("console", camera=True)
    token = make_token("creator-1", "creator", name="Cleo")
    await page.goto(f"{server.base_url}/console#token={token}")
    await page.wait_for_selector("body[data-ready='1']")
    assert "Cleo" in await page.text_content("#whoami")
    assert "#token" not in page.url, "the token is taken out of the address bar"
    await page.click("#camera-btn")
    await page.wait_for_function(
        "() => document.getElementById('preview').videoWidth > 0", timeout=10000)
    await browsers.shot(page, "console-camera")


async def test_console_refuses_a_viewer_token(
        server: RunningServer, browsers: Browsers, make_token) -> None:
    page = await browsers.page("console")
    await page.goto(f"{server.base_url}/console")
    await page.wait_for_selector("body[data-ready='1']")
    await page.fill("#token-input", make_token("viewer-9", "viewer"))
    await page.click("#token-form button")
    await page.locator("#auth-error").wait_for(state="visible")
    assert "creator token is needed" in await page.text_content("#auth-error")
