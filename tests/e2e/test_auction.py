"""An auction in three headless Chromiums against the real server: the creator starts
it from the console; two viewers bid with the page's buttons, see the leading bid,
the server's countdown and being outbid; at the close the winner's page says so and
shows the hold to pay, the other's who won, the console the outcome. No page logs an
error or a failed load (tests/e2e/conftest.py).

The auction runs for 2 minutes, and the test ends it when it has seen both bids by
setting its end in Redis to Redis' own now (the keeper then closes it as any due
auction): a short real window raced three Chromiums on a loaded machine.
"""

from __future__ import annotations

import re

import pytest

from checkout import auction
from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop

pytestmark = pytest.mark.timeout(120)


async def _viewer(browsers: Browsers, base: str, drop_id: int, token: str, name: str):
    page = await browsers.page(name, phone=True)
    await page.goto(f"{base}/d/{drop_id}#token={token}")
    await page.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    return page


async def _status(page) -> str:
    return (await page.text_content("#auction-status") or "").strip()


async def _end_now(r, drop_id: int) -> None:
    """End the drop's one running auction now, by Redis' clock."""
    [member] = await r.smembers(auction.ACTIVE_AUCTIONS)
    d, a = (int(x) for x in member.decode().split(":"))
    assert d == drop_id
    sec, usec = await r.time()
    await r.hset(auction.auction_key(d, a), "ends_at", sec * 1000 + usec // 1000)


async def test_an_auction_from_the_console_to_the_winner(
        server: RunningServer, browsers: Browsers, http, make_token, r) -> None:
    base = server.base_url
    creator = make_token("creator-1", "creator", name="Cleo")
    drop = await api_drop(http, creator, units=1)
    drop_id = drop["id"]
    ann = await _viewer(browsers, base, drop_id, make_token("ann", "viewer", name="Ann"),
                        "viewer-ann")
    bob = await _viewer(browsers, base, drop_id, make_token("bob", "viewer", name="Bob"),
                        "viewer-bob")

    console = await browsers.page("console")
    await console.goto(f"{base}/console?drop={drop_id}#token={creator}")
    await console.wait_for_function("() => window.__console.drop !== null", timeout=15_000)
    await console.fill("#auction-start", "10.00")
    await console.fill("#auction-increment", "1.00")
    await console.fill("#auction-duration", "120")  # ended by the test (_end_now)
    await console.fill("#auction-snipe", "3")
    await console.click("#auction-btn")
    await console.wait_for_selector("#auction-list li[data-state='running']", timeout=10_000)

    # Both pages show the auction with bid buttons from the start price, and a timer.
    for page in (ann, bob):
        await page.wait_for_selector("#auction:not([hidden]) .bid-btn", timeout=10_000)
        assert (await page.text_content("#auction-status")).strip() == "No bids yet"
        assert await page.get_attribute(".bid-btn", "data-amount") == "1000"
        timer = (await page.text_content("#auction-timer")).strip()
        assert re.fullmatch(r"2:00|1:[0-5]\d", timer), timer  # the server's 2 minutes
    await browsers.shot(ann, "auction-open")

    await ann.click(".bid-btn[data-amount='1000']")
    await ann.wait_for_function(
        "() => document.getElementById('auction-status').textContent"
        " === \"You're the highest bidder\"", timeout=10_000)
    await bob.wait_for_function(
        "() => document.getElementById('auction-status').textContent === 'Ann leads'",
        timeout=10_000)
    await bob.wait_for_selector(".bid-btn[data-amount='1100']", timeout=10_000)
    await bob.click(".bid-btn[data-amount='1100']")
    await ann.wait_for_function(
        "() => document.getElementById('auction-status').textContent === 'You were outbid'",
        timeout=10_000)
    assert "11.00" in await ann.text_content("#auction-amount")
    await browsers.shot(ann, "auction-outbid")

    # The close: Bob won and holds the unit; Ann is told who won; the console says sold.
    await _end_now(r, drop_id)
    await bob.wait_for_function(
        "() => document.getElementById('auction-status').textContent"
        " === 'You won! Pay to keep it.'", timeout=20_000)
    await bob.wait_for_function("() => window.__dropState.order.phase === 'held'",
                                timeout=10_000)
    await ann.wait_for_function(
        "() => document.getElementById('auction-status').textContent === 'Sold to Bob'",
        timeout=10_000)
    assert await ann.locator(".bid-btn").count() == 0
    await browsers.shot(bob, "auction-won")
    await console.wait_for_selector("#auction-list li[data-state='closed']", timeout=10_000)
    assert "sold" in await console.text_content("#auction-list li")
