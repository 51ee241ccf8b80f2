"""The creator's console edits a product's variants in headless Chromium against the
real server: options (size, colour), each variant's stock, per-buyer limit, price
override and image, saved with one PATCH (a stale save is refused, not applied), then
what is left and sold of each variant live while buyers buy. Every test also fails on
any console error or failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers

pytestmark = pytest.mark.timeout(150)


async def _fill_variant(row, values: list[str], units: str, limit: str = "",
                        price: str = "", image: str = "") -> None:
    for i, value in enumerate(values):
        await row.locator(f"input[data-f='value'][data-o='{i}']").fill(value)
    await row.locator("input[data-f='units']").fill(units)
    await row.locator("input[data-f='limit']").fill(limit)
    await row.locator("input[data-f='price']").fill(price)
    await row.locator("input[data-f='imageUrl']").fill(image)


async def _cell(page, product_id: int, variant_id: int, cls: str) -> str:
    return await page.text_content(
        f"#products-live li[data-product='{product_id}'] tr[data-variant='{variant_id}'] "
        f"td.{cls}")


async def test_the_console_creates_and_edits_variants_and_shows_them_sell(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    token = make_token("creator-1", "creator", name="Cleo")
    auth = {"authorization": f"Bearer {token}"}
    console = await browsers.page("console")
    await console.goto(f"{server.base_url}/console#token={token}")
    await console.wait_for_selector("body[data-ready='1']")
    await console.click("#create-details summary")
    await console.click("#create-btn")
    await console.wait_for_function("() => window.__console.drop?.state === 'draft'")
    drop_id = await console.evaluate("window.__console.drop.id")

    # The draft's one product, no variants yet: name the options, add two variants.
    product = console.locator("#products-editor fieldset.product-edit").first
    await product.wait_for(state="visible", timeout=10_000)
    assert await product.locator("input[data-f='title']").input_value() == "Limited hoodie"
    await product.locator("input.option-names").fill("size, colour")
    await product.locator("input.option-names").press("Tab")  # change: the columns
    await product.locator("button[data-do='add-variant']").click()
    await product.locator("button[data-do='add-variant']").click()
    rows = product.locator("tr.variant-row")
    assert await rows.count() == 2
    assert await product.locator("thead th").all_inner_texts() == [
        "size", "colour", "Units", "Limit", "Price (USD)", "Image URL", ""]
    await _fill_variant(rows.nth(0), ["M", "black"], "3", limit="1")
    await _fill_variant(rows.nth(1), ["L", "black"], "2", price="55",
                        image="/static/img/favicon.svg")
    # the product's units follow its variants' (the server's rule: their sum)
    assert await product.locator("input[data-f='units']:not([data-v])").input_value() == "5"
    await product.locator("input[data-f='limit']:not([data-v])").fill("2")
    await console.click("#products-save")
    await console.wait_for_function(
        "() => document.getElementById('products-status').textContent.startsWith('saved')",
        timeout=10_000)

    saved = (await http.get(f"/v1/drops/{drop_id}", headers=auth)).json()
    hoodie = saved["products"][0]
    assert hoodie["units"] == 5 and hoodie["per_buyer_limit"] == 2
    assert [(v["title"], v["options"], v["units"], v["per_buyer_limit"], v["price"],
             v["image_url"]) for v in hoodie["variants"]] == [
        ("M / black", {"size": "M", "colour": "black"}, 3, 1, None, ""),
        ("L / black", {"size": "L", "colour": "black"}, 2, None, 5500,
         "/static/img/favicon.svg")]
    m_id, l_id = (v["variant_id"] for v in hoodie["variants"])
    # The editor now holds the saved variants by id: an edit updates them in place.
    await console.wait_for_function(
        f"() => document.querySelector(\"tr.variant-row[data-variant='{l_id}']\") !== null")
    await rows.nth(1).locator("input[data-f='units']").fill("4")
    await console.click("#products-save")
    await console.wait_for_function(
        "(v) => document.getElementById('products-status').textContent"
        ".startsWith('saved') && window.__console.drop.version > v",
        arg=saved["version"], timeout=10_000)
    hoodie = (await http.get(f"/v1/drops/{drop_id}", headers=auth)).json()["products"][0]
    assert [(v["variant_id"], v["units"]) for v in hoodie["variants"]] == [
        (m_id, 3), (l_id, 4)]
    assert hoodie["units"] == 7

    # A change made elsewhere meanwhile: the console's save is refused (412), nothing
    # of it applied, and Discard shows the drop as it now is.
    other = await http.patch(f"/v1/drops/{drop_id}", headers=auth,
                             json={"title": "Renamed in another tab"})
    assert other.status_code == 200, other.text
    browsers.expect_http(412, f"/v1/drops/{drop_id}")
    await rows.nth(0).locator("input[data-f='units']").fill("30")
    await console.click("#products-save")
    await console.locator("#products-error").wait_for(state="visible", timeout=10_000)
    assert "changed since you opened it" in await console.text_content("#products-error")
    hoodie = (await http.get(f"/v1/drops/{drop_id}", headers=auth)).json()["products"][0]
    assert [v["units"] for v in hoodie["variants"]] == [3, 4]
    await console.click("#products-discard")
    await console.wait_for_function(
        "() => document.querySelector(\"tr.variant-row input[data-f='units']\").value === '3'"
        " && document.getElementById('drop-label').textContent.includes('another tab')")
    assert await console.locator("#products-error").is_hidden()
    # ... and a save from there goes through (the editor holds the new version).
    await rows.nth(0).locator("input[data-f='price']").fill("49.50")
    await console.click("#products-save")
    await console.wait_for_function(
        "(v) => document.getElementById('products-status').textContent"
        ".startsWith('saved') && window.__console.drop.version > v",
        arg=other.json()["version"], timeout=10_000)
    hoodie = (await http.get(f"/v1/drops/{drop_id}", headers=auth)).json()["products"][0]
    assert [(v["units"], v["price"]) for v in hoodie["variants"]] == [(3, 4950), (4, 5500)]
    await browsers.shot(console, "console-variants-editor")

    # On air: the editor gives way to what is left and sold of each variant, live.
    pid = hoodie["product_id"]
    starts = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    for step, body in (("schedule", {"starts_at": starts}), ("live", {}),
                       ("buy-now", {"product_id": pid})):
        r = await http.post(f"/v1/drops/{drop_id}/{step}", headers=auth, json=body)
        assert r.status_code == 200, (step, r.text)
    await console.locator("#products-live").wait_for(state="visible", timeout=15_000)
    assert await console.locator("#products-form").is_hidden()
    await console.wait_for_function(
        f"() => document.querySelector(\"#products-live tr[data-variant='{l_id}'] td.left\")"
        "?.textContent === '4'", timeout=15_000)
    assert await _cell(console, pid, l_id, "sold") == "0"
    buys = ((m_id, "fan-1"), (l_id, "fan-2"), (l_id, "fan-3"))
    for variant_id, user in buys:
        r = await http.post(f"/v1/drops/{drop_id}/buy",
                            json={"product_id": pid, "variant_id": variant_id},
                            headers={"authorization": f"Bearer {make_token(user)}",
                                     "Idempotency-Key": f"k-{user}"})
        assert r.status_code == 201, r.text
    await console.wait_for_function(
        f"() => document.querySelector(\"#products-live tr[data-variant='{l_id}'] td.left\")"
        ".textContent === '2'", timeout=15_000)
    assert await _cell(console, pid, l_id, "sold") == "2"
    await console.wait_for_function(
        f"() => document.querySelector(\"#products-live tr[data-variant='{m_id}'] td.sold\")"
        ".textContent === '1'", timeout=15_000)
    assert await _cell(console, pid, m_id, "left") == "2"
    head = await console.text_content(f"#products-live li[data-product='{pid}'] .sold")
    assert head == "3 sold"
    await browsers.shot(console, "console-variants-live")
