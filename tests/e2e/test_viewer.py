"""The viewer's page in headless Chromium against the real server, on its own: what
it does while it waits for the stream, when a drop cannot be shown, BUY NOW before
the viewer has touched the page. Every test also fails on any console error or
failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop
from tests.whip_publisher import WhipPublisher

pytestmark = pytest.mark.timeout(120)

PLAYING = ("() => { const v = document.getElementById('video');"
           " return v.readyState >= 2 && v.currentTime > 0.3 && v.videoWidth > 0; }")


async def test_a_waiting_page_requests_no_playlist_and_plays_once_live(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    """Opened before the creator publishes, the page asks for no playlist (at 50,000
    waiting viewers a 2 s poll was ~25,000 requests a second, all 404); the stream's
    "live" starts the player, which then plays; the end of the stream is played out
    without an error."""
    token = make_token("creator-1", "creator")
    drop = await api_drop(http, token)
    page = await browsers.page("viewer", phone=True)
    hls_requests: list[str] = []
    page.on("request", lambda r: "/hls/" in r.url and hls_requests.append(r.url))
    await page.goto(f"{server.base_url}/d/{drop['id']}")
    await page.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    assert await page.text_content("#conn") == "connected"
    assert "Waiting for the stream" in await page.text_content("#stream-status")
    await page.wait_for_timeout(4_500)  # two of the old poll's periods
    assert hls_requests == []

    pub = WhipPublisher(f"{server.base_url}/v1/drops/{drop['id']}/whip", token,
                        seconds=8.0)
    pub.start()
    try:
        await page.wait_for_function("() => window.__dropState.stream.status === 'live'",
                                     timeout=30_000)
        assert await page.locator("#stream-status").is_hidden()
        await page.wait_for_function(PLAYING, timeout=45_000)
        await browsers.shot(page, "viewer-playing")
        await pub.wait(30)
        assert pub.error is None, pub.error
        await page.wait_for_function(
            "() => window.__dropState.stream.status === 'offline'", timeout=15_000)
        await page.wait_for_timeout(2_000)  # the player plays out the ended playlist
    finally:
        pub.kill()
    assert hls_requests and all("/hls/" in u for u in hls_requests)


async def test_a_link_to_a_draft_or_a_missing_drop_says_it_is_not_available(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    draft = await api_drop(http, make_token("creator-1", "creator"), steps=())
    for name, drop_id in (("draft", draft["id"]), ("missing", 999_999)):
        page = await browsers.page(name, phone=True)
        await page.goto(f"{server.base_url}/d/{drop_id}")
        await page.wait_for_function("() => window.__dropState?.unavailable === true",
                                     timeout=15_000)
        status = await page.text_content("#stream-status")
        assert "not available" in status and "Waiting" not in status
        assert await page.text_content("#conn") == "not available"
        assert await page.locator("#chat-form").is_hidden()
        assert await page.locator("#countdown").is_hidden()
        await browsers.shot(page, f"viewer-{name}")


VIBRATE_SPY = """
window.__vibrations = [];
Object.defineProperty(Navigator.prototype, 'vibrate', {configurable: true,
  value: function (pattern) { window.__vibrations.push(pattern); return true; }});
// Says (a console line, not a query: a query would count as a tap) when BUY NOW has
// been shown, which is when the page vibrates or not.
document.addEventListener('DOMContentLoaded', () => {
  const ov = document.getElementById('buy-overlay');
  new MutationObserver(() => {
    if (ov.dataset.mode === 'open') console.log('spy: buy-overlay open');
  }).observe(ov, {attributes: true, attributeFilter: ['data-mode']});
});
"""


async def test_buy_now_vibrates_only_for_a_viewer_who_tapped_the_page(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    """Chromium refuses navigator.vibrate (and logs an error) until the viewer has
    interacted with the page. Playwright's own queries count as interaction (they
    run as user gestures), so the untouched page is not queried until the end: the
    other page's viewer count says when both have joined."""
    token = make_token("creator-1", "creator")
    drop = await api_drop(http, token)
    untouched = await browsers.page("untouched", phone=True)
    await untouched.add_init_script(VIBRATE_SPY)
    await untouched.goto(f"{server.base_url}/d/{drop['id']}")
    tapped = await browsers.page("tapped", phone=True)
    await tapped.add_init_script(VIBRATE_SPY)
    await tapped.goto(f"{server.base_url}/d/{drop['id']}")
    await tapped.wait_for_function(
        "() => document.getElementById('viewer-count').textContent === '2'", timeout=20_000)
    await tapped.tap("#drop-title")
    auth = {"authorization": f"Bearer {token}"}
    async with untouched.expect_console_message(
            lambda m: m.text == "spy: buy-overlay open", timeout=15_000):
        # the untouched page has shown BUY NOW (it waited a fixed second, which a
        # loaded machine's page outlasted)
        r = await http.post(f"/v1/drops/{drop['id']}/buy-now", headers=auth,
                            json={"product_id": drop["products"][0]["product_id"]})
        assert r.status_code == 200, r.text
    await tapped.locator("#buy-overlay").wait_for(state="visible", timeout=10_000)
    assert await untouched.evaluate("window.__vibrations") == []
    assert await untouched.locator("#buy-overlay").is_visible()
    assert await tapped.evaluate("window.__vibrations") == [80]
