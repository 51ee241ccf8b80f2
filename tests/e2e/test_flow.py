"""The whole product in two headless Chromiums against the real server:

1. the creator signs in to the console, creates a drop, starts the fake camera and
   publishes it over WHIP, and goes live (a 5 s countdown, then live);
2. a viewer opens the live page on a phone-sized screen: it connects, gets a dev
   token and plays the stream (hls.js);
3. the creator pins the product and triggers BUY NOW: the viewer's page shows the
   overlay with the remaining stock;
4. the viewer buys: "You're buyer #1" with the hold countdown, pays (fake gateway),
   sees "Paid";
5. the creator's stats show the sale and the revenue; the viewer's chat shows markup
   as text;
6. four other buyers take the rest: the viewer sees SOLD OUT;
7. after a dropped connection the viewer reconnects and resumes (sales closed
   meanwhile); the creator ends the drop and stops publishing: the viewer sees the
   end and the player plays the stream out.

No page logs an error or a failed load at any step (tests/e2e/conftest.py).
Screenshots of every step are kept under artifacts/e2e/<test>/.
"""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers

pytestmark = pytest.mark.timeout(240)


async def _text(page, selector: str) -> str:
    return (await page.text_content(selector) or "").strip()


async def _click_action(console, action: str) -> None:
    """Click a drop control once the console enables it; if it never does, say why:
    the drop the console holds (state, version, allowed actions) and its log."""
    selector = f"[data-action='{action}']"
    try:
        await console.wait_for_function(
            f"() => !document.querySelector(\"{selector}\").disabled", timeout=15_000)
    except Exception as exc:
        held = await console.evaluate(
            "(() => { const d = window.__console.drop;"
            " return d && {state: d.state, version: d.version, allowed: d.allowed_actions}; })()")
        log = await console.evaluate("document.getElementById('log').innerText")
        raise AssertionError(f"{action} stayed disabled; console holds {held}\n{log}") from exc
    await console.click(selector, timeout=15_000)  # its error names what blocked it


async def test_a_whole_drop_from_camera_to_the_end(
        server: RunningServer, browsers: Browsers, make_token, http) -> None:
    base = server.base_url
    token = make_token("creator-e2e", "creator", name="Cleo")

    # --- 1. the console: sign in, create a drop, camera, publish, go live ---------
    console = await browsers.page("console", camera=True)
    await console.goto(f"{base}/console#token={token}")
    await console.wait_for_selector("body[data-ready='1']")
    await console.click("#create-details summary")
    await console.fill("#new-title", "E2E drop")
    await console.fill("#new-product", "Signed vinyl")
    await console.fill("#new-price", "49.00")
    await console.fill("#new-units", "5")
    await console.click("#create-btn")
    await console.wait_for_function("() => window.__console.drop !== null")
    drop = await console.evaluate("window.__console.drop")
    drop_id = drop["id"]
    product_id = drop["products"][0]["product_id"]
    assert drop["state"] == "draft"

    await console.click("#camera-btn")
    await console.wait_for_function(
        "() => document.getElementById('preview').videoWidth > 0", timeout=10_000)
    await console.click("#publish-btn")
    try:
        await console.wait_for_function(
            "() => document.getElementById('publish-state').dataset.state === 'connected'",
            timeout=20_000)
    except Exception as exc:  # say why: the state reached and what the page logged
        state = await console.evaluate(
            "document.getElementById('publish-state').dataset.state")
        await browsers.shot(console, "0-publish-failed")
        log = "\n".join(browsers.logs["console"][-30:])
        raise AssertionError(f"WHIP publish stuck in {state!r}:\n{log}") from exc

    await _click_action(console, "go_live")
    await console.wait_for_function(
        "() => document.getElementById('drop-state').textContent === 'live'",
        timeout=20_000)
    await browsers.shot(console, "1-console-live")

    # --- 2. the viewer: connect and play -------------------------------------------
    viewer = await browsers.page("viewer", phone=True)
    await viewer.goto(f"{base}/d/{drop_id}")
    await viewer.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    assert await _text(viewer, "#drop-title") == "E2E drop"
    assert await viewer.get_attribute("#drop-state", "data-state") == "live"
    # frames are decoded and time advances: the stream really plays
    await viewer.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v.readyState >= 2 && v.currentTime > 0.5 && v.videoWidth > 0; }",
        timeout=45_000)
    await browsers.shot(viewer, "2-viewer-playing")

    # --- 3. pin + BUY NOW reaches the viewer ---------------------------------------
    await console.select_option("#product-select", str(product_id))
    await _click_action(console, "pin")
    await viewer.locator("#pinned").wait_for(state="visible", timeout=10_000)
    assert await _text(viewer, "#pinned-title") == "Signed vinyl"
    await _click_action(console, "buy_now")
    overlay = viewer.locator("#buy-overlay")
    await overlay.wait_for(state="visible", timeout=10_000)
    assert await _text(viewer, "#buy-title") == "Signed vinyl"
    assert "49.00" in await _text(viewer, "#buy-price")
    assert await _text(viewer, "#buy-remaining") == "5 left"
    await viewer.wait_for_timeout(300)  # let the overlay's pop-in animation finish
    await browsers.shot(viewer, "3-viewer-buy-now")

    # --- 4. buy: hold with countdown, buyer number, pay ----------------------------
    await viewer.click("#buy-btn")
    await viewer.wait_for_function(
        "() => document.getElementById('order').dataset.phase === 'held'", timeout=10_000)
    assert await _text(viewer, "#order-headline") == "You're buyer #1"
    assert await viewer.locator("#hold").is_visible()
    countdown = await _text(viewer, "#hold-countdown")
    assert countdown not in ("", "0:00"), countdown
    await viewer.wait_for_function(
        "() => document.getElementById('buy-remaining').textContent === '4 left'",
        timeout=10_000)
    await browsers.shot(viewer, "4-viewer-held")
    await viewer.click("#pay-btn")
    await viewer.wait_for_function(
        "() => document.getElementById('order').dataset.phase === 'paid'", timeout=20_000)
    assert await _text(viewer, "#order-headline") == "Paid! You're buyer #1"
    await browsers.shot(viewer, "5-viewer-paid")

    # --- 5. the creator's stats ----------------------------------------------------
    await console.wait_for_function(
        "() => document.getElementById('stat-sold').textContent === '1'", timeout=15_000)
    assert "49.00" in await _text(console, "#stat-revenue")
    assert await _text(console, "#stat-holds") == "0"
    assert await _text(console, "#stat-remaining") == "4"
    await console.wait_for_function(
        "() => Number(document.getElementById('stat-viewers').textContent) >= 1",
        timeout=15_000)
    await browsers.shot(console, "6-console-stats")

    # --- chat is text, never markup ------------------------------------------------
    evil = "<img src=x onerror=window.__pwned=1>hello"
    await viewer.fill("#chat-input", evil)
    await viewer.click("#chat-form button")
    item = viewer.locator("#chat-list li .text", has_text="hello")
    await item.wait_for(timeout=10_000)
    assert await item.text_content() == evil
    assert await viewer.locator("#chat-list img").count() == 0
    assert await viewer.evaluate("window.__pwned") is None

    # --- 6. the others sell it out -----------------------------------------------
    for i in range(4):
        r = await http.post(f"/v1/drops/{drop_id}/buy", json={"product_id": product_id},
                            headers={"authorization": f"Bearer {make_token(f'buyer-{i}')}",
                                     "idempotency-key": f"e2e-{i}"})
        assert r.status_code == 201, r.text
    await viewer.wait_for_function(
        "() => document.getElementById('buy-overlay').dataset.mode === 'sold_out'",
        timeout=10_000)
    assert await _text(viewer, "#buy-btn") == "SOLD OUT"
    await console.wait_for_function(
        "() => document.getElementById('stat-remaining').textContent === '0'",
        timeout=15_000)
    await browsers.shot(viewer, "6-viewer-sold-out")

    # --- 7. reconnect and resume, end, stop publishing -----------------------------
    await viewer.evaluate("window.__dropClient.dropConnection()")
    await viewer.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'reconnecting'",
        timeout=5_000)
    await browsers.shot(viewer, "7-viewer-reconnecting")
    await _click_action(console, "close")  # happens while the viewer is away
    await viewer.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    await overlay.wait_for(state="hidden", timeout=10_000)
    assert await viewer.get_attribute("#drop-state", "data-state") == "closed"
    await browsers.shot(viewer, "8-viewer-resumed-closed")

    await _click_action(console, "end")
    await viewer.wait_for_function(
        "() => document.getElementById('stream-status').textContent"
        " === 'This drop has ended.'", timeout=10_000)
    await console.click("#publish-btn")  # Stop publishing: the WHIP DELETE
    await console.wait_for_function(
        "() => document.getElementById('publish-btn').textContent === 'Publish'")
    await viewer.wait_for_function(
        "() => window.__dropState.stream.status === 'offline'", timeout=15_000)
    await viewer.wait_for_timeout(2_000)  # the player reaches the end of the playlist
    await browsers.shot(viewer, "9-viewer-ended")
