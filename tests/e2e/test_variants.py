"""Variants and the product list on the viewer's page, in headless Chromium against the
real server: the drop's products with their pictures (or the local placeholder), the
variant picker of the product on sale with what is left of each, a buy of the picked
variant, the coalesced "N sold", a sold-out variant that cannot be picked. Every test
also fails on any console error or failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers

pytestmark = pytest.mark.timeout(120)


async def test_the_product_list_and_a_variant_bought_from_the_picker(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    auth = {"authorization": f"Bearer {make_token('creator-1', 'creator')}"}
    resp = await http.post("/v1/drops", headers=auth, json={
        "title": "Tee drop",
        "starts_at": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        "products": [
            {"title": "Tee", "price": 2000, "per_buyer_limit": 2,
             "description": "Heavy cotton", "image_url": "/static/img/favicon.svg",
             "variants": [{"options": {"size": "S"}, "units": 2},
                          {"options": {"size": "M"}, "units": 3, "price": 2500},
                          {"options": {"size": "L"}, "units": 1}]},
            {"title": "Mug", "price": 900, "units": 4}]})
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    tee = drop["products"][0]
    s, m, large = (v["variant_id"] for v in tee["variants"])
    for step, body in (("schedule", {}), ("live", {}),
                       ("buy-now", {"product_id": tee["product_id"]})):
        r = await http.post(f"/v1/drops/{drop['id']}/{step}", headers=auth, json=body)
        assert r.status_code == 200, (step, r.text)

    page = await browsers.page("viewer", phone=True)
    await page.goto(f"{server.base_url}/d/{drop['id']}")
    await page.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    # The product list: both products in the drop's order, the mug with the placeholder.
    items = page.locator("#product-list .product-item")
    await items.nth(1).wait_for(timeout=10_000)
    assert await items.count() == 2
    assert "Tee" in await items.nth(0).inner_text()
    assert "Heavy cotton" in await items.nth(0).inner_text()
    assert "S: 2 · M: 3 · L: 1" in await items.nth(0).inner_text()
    assert (await items.nth(0).locator("img").get_attribute("src")) == "/static/img/favicon.svg"
    assert (await items.nth(1).locator("img").get_attribute("src")
            ) == "/static/img/product-placeholder.svg"
    assert await items.nth(1).locator("img").evaluate("i => i.complete && i.naturalWidth > 0")

    # The picker: three sizes, the first one with stock chosen; pick M and buy it.
    picker = page.locator("#variant-picker")
    await picker.wait_for(state="visible", timeout=10_000)
    assert await picker.locator("button").all_inner_texts() == [
        "S · 2 left", "M · 3 left", "L · 1 left"]
    await page.click(f"#variant-picker [data-variant-id='{m}']")
    assert await page.get_attribute(f"[data-variant-id='{m}']", "aria-checked") == "true"
    assert "25.00" in await page.text_content("#buy-price")
    await browsers.shot(page, "variants-picker")
    await page.click("#buy-btn")
    await page.wait_for_function("() => window.__dropState.order.phase === 'held'",
                                 timeout=10_000)
    order = await page.evaluate("window.__dropState.order")
    assert order["variantId"] == str(m) and order["amount"] == 2500
    # The coalesced stock reaches the page: M has 2 left, the tee "1 sold".
    await page.wait_for_function(
        f"() => document.querySelector(\"[data-variant-id='{m}']\")?.textContent"
        " === 'M · 2 left'", timeout=10_000)
    await page.wait_for_function(
        "() => document.querySelector('.product-item .product-sold').textContent"
        " === '1 sold'", timeout=10_000)

    # Someone else takes the one L: it cannot be picked any more.
    other = {"authorization": f"Bearer {make_token('buyer-2', 'viewer')}",
             "idempotency-key": "l1"}
    r = await http.post(f"/v1/drops/{drop['id']}/buy", headers=other,
                        json={"product_id": tee["product_id"], "variant_id": large})
    assert r.status_code == 201, r.text
    await page.wait_for_function(
        f"() => document.querySelector(\"[data-variant-id='{large}']\")?.disabled === true",
        timeout=10_000)
    await page.wait_for_function(
        "() => document.querySelector('.product-item .product-sold').textContent"
        " === '2 sold'", timeout=10_000)
    assert s  # S stays on sale
    await browsers.shot(page, "variants-after")
