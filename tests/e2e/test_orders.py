"""My orders and the receipt in headless Chromium against the real server: a viewer
buys a variant and pays (the fake gateway's dev confirm); the order panel shows the
receipt (the variant, the amounts, the payment reference); "My orders" follows the
order's state live -- a refund made elsewhere shows without a reload --; "All drops"
adds an order from another drop, and the page without a drop lists both. The list is
read when the viewer opens the panel, never on the page's load. Every test
also fails on any console error or failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from dropserver.auth import Role
from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers
from tests.test_reserve_api import bearer, post_buy, selling_drop
from tests.test_variants_api import selling, tee

pytestmark = pytest.mark.timeout(150)

OPEN = "() => document.getElementById('conn').dataset.state === 'open'"


def _state_is(order_id: str, text: str) -> str:
    return (f"() => document.querySelector(\"#my-orders-list li[data-id='{order_id}'] "
            f".my-order-state\")?.textContent === '{text}'")


async def _rows(page, selector: str) -> dict[str, str]:
    return await page.evaluate(
        """(sel) => Object.fromEntries([...document.querySelectorAll(sel + ' .receipt-row')]
            .map((r) => [r.querySelector('dt').textContent, r.querySelector('dd').textContent]))""",
        selector)


async def test_a_buyer_sees_the_receipt_and_the_state_of_their_orders(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    creator = bearer(make_token("creator-1", Role.CREATOR, name="Cleo"))
    # (a picture the server has: a missing one would be a failed load)
    drop = await selling(http, creator, tee(image_url="/static/img/product-placeholder.svg"))
    product = drop["products"][0]
    m = product["variants"][1]["variant_id"]

    viewer = await browsers.page("viewer", phone=True)
    asked: list[str] = []
    viewer.on("request", lambda r: asked.append(r.url) if "/v1/me/orders" in r.url else None)
    await viewer.goto(f"{server.base_url}/d/{drop['id']}")
    await viewer.wait_for_function(OPEN, timeout=15_000)
    await viewer.locator("#my-orders").wait_for(state="visible", timeout=10_000)
    # not read on load (a drop's start opens the page for every viewer at once): only
    # when the viewer opens the panel
    await viewer.wait_for_timeout(300)
    assert asked == [] and await viewer.is_hidden("#my-orders-list")
    await viewer.click("#my-orders-details summary")
    await viewer.locator("#my-orders-empty").wait_for(state="visible", timeout=10_000)
    assert len(asked) == 1 and f"drop_id={drop['id']}" in asked[0]

    await viewer.click(f"#variant-picker .variant-btn[data-variant-id='{m}']")
    await viewer.click("#buy-btn")
    await viewer.wait_for_function(
        "() => document.getElementById('pay-btn').textContent === 'Pay $25.00'",
        timeout=15_000)
    order_id = await viewer.evaluate("window.__dropState.order.orderId")
    # the order is in My orders, waiting for its payment, before anything is paid
    await viewer.wait_for_function(_state_is(order_id, "Awaiting payment"), timeout=10_000)
    assert await viewer.is_hidden("#order-receipt")

    await viewer.click("#pay-btn")
    await viewer.wait_for_function(
        "() => document.getElementById('order').dataset.phase === 'paid'", timeout=15_000)
    receipt = viewer.locator("#order-receipt .receipt")
    await receipt.wait_for(timeout=10_000)
    assert await receipt.get_attribute("data-id") == order_id
    assert await receipt.locator(".receipt-item-name").all_text_contents() == [
        "Tee · M / black"]
    assert await receipt.locator(".receipt-item-amount").all_text_contents() == ["$25.00"]
    rows = await _rows(viewer, "#order-receipt")
    assert rows["Total"] == "$25.00" and rows["Paid"] == "$25.00"
    assert rows["Status"] == "Paid" and rows["Order number"] == order_id
    assert rows["Payment reference"].startswith("pi_") and rows["Paid on"]
    assert "Refunded" not in rows
    await viewer.wait_for_function(_state_is(order_id, "Paid"), timeout=10_000)
    await browsers.shot(viewer, "paid-receipt")

    # a refund made elsewhere (the creator's) shows live: order.refunded on the socket
    r = await http.post(f"/v1/orders/{order_id}/refund", headers=creator)
    assert r.status_code == 200, r.text
    await viewer.wait_for_function(_state_is(order_id, "Refunded"), timeout=10_000)
    await viewer.wait_for_function(
        "() => document.querySelector('#order-receipt .receipt')?.dataset.state "
        "=== 'refunded'", timeout=10_000)
    rows = await _rows(viewer, "#order-receipt")
    assert rows["Refunded"] == "$25.00" and rows["Status"] == "Refunded"
    assert rows["Refunded on"]

    # the same buyer's order in another drop: "All drops" lists it too
    token = await viewer.evaluate("localStorage.getItem('dropserver.viewer_token')")
    other_drop, other_pid = await selling_drop(http, creator)
    resp = await post_buy(http, other_drop, bearer(token), other_pid)
    assert resp.status_code == 201, resp.text
    other_order = resp.json()["hold_id"]
    assert await viewer.locator("#my-orders-list li").count() == 1  # this drop's only
    await viewer.check("#my-orders-all")
    await viewer.wait_for_function(
        "() => document.querySelectorAll('#my-orders-list li').length === 2",
        timeout=10_000)
    ids = await viewer.eval_on_selector_all("#my-orders-list li",
                                            "els => els.map((e) => e.dataset.id)")
    assert ids == [other_order, order_id]
    # a receipt opens from the list
    await viewer.click(f"#my-orders-list li[data-id='{order_id}'] .my-order-head")
    rows = await _rows(viewer, f"#my-orders-list li[data-id='{order_id}']")
    assert rows["Order number"] == order_id and rows["Status"] == "Refunded"
    await browsers.shot(viewer, "my-orders-all-drops")

    # the page without a drop: the same buyer's orders in every drop
    home = await browsers.page("home")
    await home.goto(f"{server.base_url}/#token={token}")
    await home.wait_for_function(
        "() => document.querySelectorAll('#my-orders-list li').length === 2",
        timeout=10_000)
    assert await home.is_hidden("#my-orders-all")  # every drop already
    metas = await home.locator("#my-orders-list .my-order-meta").all_text_contents()
    assert metas[1].endswith("· Drop") and metas[0].endswith("· Friday drop")
