"""The shoppable replay in headless Chromium against the real server: a real stream
(FFmpeg over WHIP, tests/whip_publisher.py) with two BUY NOWs and a sell-out makes the
replay and its moments; after the end the creator puts what is left on sale for the
replay. A viewer opening the drop's page then plays the replay at once (not an offline
player), sees the moments, jumps to one and back (the player seeks), and buys the
product still in stock from the replay: hold, pay, paid. The page logs no error and
loads nothing that fails (tests/e2e/conftest.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers
from tests.whip_publisher import WhipPublisher

pytestmark = pytest.mark.timeout(180)

PLAYING = ("() => { const v = document.getElementById('video');"
           " return v.readyState >= 2 && v.currentTime > 0.3 && v.videoWidth > 0; }")


async def _until(check, limit: float = 20.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def _recorded_drop(server: RunningServer, http, make_token) -> tuple[dict, dict]:
    """A drop streamed for ~11 s: BUY NOW of the hoodie, then (4 s later) of the cap,
    which two buyers sell out; then the end and the replay's sales (only the hoodie has
    units left). Returns (the drop, its replay timeline)."""
    token = make_token("creator-1", "creator")
    auth = {"authorization": f"Bearer {token}"}
    resp = await http.post("/v1/drops", headers=auth, json={
        "title": "Replay drop",
        "starts_at": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        "products": [{"title": "Hoodie", "price": 4500, "units": 3},
                     {"title": "Cap", "price": 2000, "units": 2, "per_buyer_limit": 2}]})
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    hoodie, cap = (p["product_id"] for p in drop["products"])
    base = f"/v1/drops/{drop['id']}"

    async def step(path: str, body: dict | None = None) -> dict:
        r = await http.post(f"{base}/{path}", headers=auth, json=body or {})
        assert r.status_code == 200, (path, r.text)
        return r.json()

    await step("schedule")
    await step("live")
    pub = WhipPublisher(f"{server.base_url}{base}/whip", token, seconds=11.0)
    pub.start()
    try:
        async def on_air():
            return (await http.get(f"{base}/stream")).json()["status"] == "live"

        await _until(on_air, 30)
        await asyncio.sleep(1.5)
        await step("buy-now", {"product_id": hoodie})
        await asyncio.sleep(4.0)
        await step("close")
        await step("buy-now", {"product_id": cap})
        r = await http.post(f"{base}/buy", json={"product_id": cap, "quantity": 2},
                            headers={"authorization": f"Bearer {make_token('buyer-1')}",
                                     "idempotency-key": "caps"})
        assert r.status_code == 201, r.text
        await pub.wait(40)
        assert pub.error is None, pub.error
    finally:
        pub.kill()

    async def finalized():
        r = await http.get(f"{base}/replay")
        return r.json() if r.status_code == 200 else None

    timeline = await _until(finalized, 20)
    await step("end")
    assert (await step("replay-sales"))["state"] == "replay"
    return drop, timeline


async def test_the_replay_plays_jumps_to_a_moment_and_sells_what_is_left(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    drop, timeline = await _recorded_drop(server, http, make_token)
    hoodie, cap = (p["product_id"] for p in drop["products"])
    at = {(m["kind"], m["product_id"]): m["media_ms"] / 1000 for m in timeline["moments"]}
    hoodie_at, cap_at = at[("buy_now", hoodie)], at[("buy_now", cap)]
    assert cap_at - hoodie_at >= 3.0, timeline
    assert ("sold_out", cap) in at

    page = await browsers.page("viewer", phone=True)
    await page.goto(f"{server.base_url}/d/{drop['id']}")
    # The replay plays at once: no "offline" or "ended" over the player.
    await page.wait_for_function("() => window.__dropState?.replay?.active === true",
                                 timeout=20_000)
    await page.wait_for_function(PLAYING, timeout=30_000)
    assert await page.locator("#stream-status").is_hidden()
    assert await page.get_attribute("#drop-state", "data-state") == "replay"
    assert await page.text_content("#drop-state") == "replay"
    moments = page.locator("#moment-list li")
    assert await moments.locator(".what").all_inner_texts() == [
        "BUY NOW · Hoodie", "BUY NOW · Cap", "Sold out · Cap"]
    hoodie_item = page.locator(f"#moment-list li[data-kind='buy_now'][data-product-id='{hoodie}']")
    cap_item = page.locator(f"#moment-list li[data-kind='buy_now'][data-product-id='{cap}']")
    assert await hoodie_item.locator(".moment-sale").inner_text() == "on sale · 3 left"
    assert await cap_item.locator(".moment-sale").count() == 0  # sold out live
    await browsers.shot(page, "replay-playing")

    # Jump forward to the cap's BUY NOW: the player seeks there; the cap is not for sale.
    await cap_item.locator("button").click()
    await page.wait_for_function(
        f"() => {{ const t = document.getElementById('video').currentTime;"
        f" return t >= {cap_at - 0.3} && t < {cap_at + 4}; }}", timeout=15_000)
    await page.wait_for_function(PLAYING, timeout=15_000)
    assert await page.locator("#buy-overlay").is_hidden()
    # The outlined moment is the cap's: its BUY NOW, or its sell-out a moment later
    # once the replay has played past it.
    current = page.locator("#moment-list li[data-current='1']")
    assert await current.get_attribute("data-product-id") == str(cap)
    assert int(await current.get_attribute("data-ms")) >= cap_at * 1000

    # Back to the hoodie's BUY NOW: the overlay offers it, bought from the replay.
    await hoodie_item.locator("button").click()
    await page.wait_for_function(
        f"() => {{ const t = document.getElementById('video').currentTime;"
        f" return t >= {hoodie_at - 0.3} && t < {cap_at - 0.5}; }}", timeout=15_000)
    overlay = page.locator("#buy-overlay")
    await overlay.wait_for(state="visible", timeout=10_000)
    assert await page.text_content("#buy-title") == "Hoodie"
    assert await page.text_content("#buy-remaining") == "3 left"
    await page.wait_for_function("() => !document.getElementById('buy-btn').disabled",
                                 timeout=10_000)
    await browsers.shot(page, "replay-buy-now")
    await page.click("#buy-btn")
    await page.wait_for_function(
        "() => document.getElementById('order').dataset.phase === 'held'", timeout=10_000)
    assert await page.text_content("#order-headline") == "You're buyer #1"
    await page.wait_for_function("() => !document.getElementById('pay-btn').disabled",
                                 timeout=15_000)
    await page.click("#pay-btn")
    await page.wait_for_function(
        "() => document.getElementById('order').dataset.phase === 'paid'", timeout=20_000)
    await page.wait_for_function(
        f"() => document.querySelector(\"#moment-list li[data-product-id='{hoodie}']"
        " .moment-sale\")?.textContent === 'on sale · 2 left'", timeout=10_000)
    await browsers.shot(page, "replay-paid")
    r = await http.get(f"/v1/drops/{drop['id']}")
    assert {p["product_id"]: p["remaining"] for p in r.json()["products"]}[hoodie] == 2
