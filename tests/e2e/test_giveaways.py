"""Giveaways in headless Chromium against the real server: the console opens one and
watches it, the viewer page enters with one tap, counts entrants, shows the winner and
how to check the draw. Every test also fails on any console error or failed load
(tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop

pytestmark = pytest.mark.timeout(150)


async def test_console_opens_a_giveaway_and_a_viewer_enters_and_wins(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    token = make_token("creator-1", "creator", name="Cleo")
    drop = await api_drop(http, token)
    viewer = await browsers.page("viewer", phone=True)
    await viewer.goto(f"{server.base_url}/d/{drop['id']}")
    await viewer.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=15_000)
    assert await viewer.locator("#giveaway").is_hidden()

    console = await browsers.page("console")
    await console.goto(f"{server.base_url}/console?drop={drop['id']}#token={token}")
    await console.wait_for_selector("body[data-ready='1']")
    await console.wait_for_function("() => window.__console.drop?.id > 0")
    assert await console.text_content("#gw-status") == "No giveaway yet."
    await console.fill("#gw-seconds-input", "6")
    await console.click("#gw-open-btn")  # no prize text: the selected product
    await console.wait_for_function("() => window.__consoleGiveaway?.id > 0")
    assert await console.locator("#gw-open-btn").is_disabled()  # one open at a time

    # The viewer sees it at once (giveaway.opened), with a countdown, and enters.
    await viewer.locator("#giveaway").wait_for(state="visible", timeout=10_000)
    assert await viewer.text_content("#gw-prize") == "Signed vinyl"
    assert "ends in 0:0" in await viewer.text_content("#gw-timer")
    await viewer.click("#gw-enter")
    await viewer.wait_for_function(
        "() => document.getElementById('gw-enter').textContent === \"You're in\"",
        timeout=10_000)
    await viewer.wait_for_function(
        "() => document.getElementById('gw-entries').textContent === '1 entered'",
        timeout=10_000)
    # The console counts the entry (giveaway.entries on its socket).
    await console.wait_for_function(
        "() => document.getElementById('gw-status').textContent.includes('1 entered')",
        timeout=10_000)
    await browsers.shot(viewer, "viewer-entered")

    # The draw: the only entrant wins, sees it, and can read the seed.
    await viewer.wait_for_function(
        "() => document.getElementById('gw-result').textContent === 'You won (#1)!'",
        timeout=30_000)
    assert await viewer.locator("#gw-enter").is_hidden()
    winners = await viewer.locator("#gw-winner-list li").all_text_contents()
    assert len(winners) == 1 and "ticket" in winners[0]
    await viewer.click("#gw-verify summary")
    seed = await viewer.text_content("#gw-seed")
    commitment = await viewer.text_content("#gw-commitment")
    body = (await http.get(f"/v1/drops/{drop['id']}/giveaways")).json()["giveaways"][-1]
    assert seed == body["seed"] and commitment == body["commitment"]
    assert await viewer.get_attribute("#gw-entrants-link", "href") == (
        f"/v1/drops/{drop['id']}/giveaways/{body['id']}/entrants")
    # The page recomputes the draw itself (Web Crypto) from the published tickets.
    await viewer.click("#gw-check")
    await viewer.wait_for_function(
        "() => document.getElementById('gw-check-result').dataset.ok === '1'",
        timeout=10_000)
    assert "Checked in your browser" in await viewer.text_content("#gw-check-result")
    await browsers.shot(viewer, "viewer-won")
    await console.wait_for_function(
        "() => document.getElementById('gw-status').textContent.includes('drawn among 1 entrant')",
        timeout=15_000)
    assert len(await console.locator("#gw-console-winners li").all_text_contents()) == 1
    assert await console.locator("#gw-open-btn").is_enabled()
    await browsers.shot(console, "console-drawn")


async def test_a_viewer_joining_late_sees_the_open_giveaway_and_a_refusal_is_shown(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    token = make_token("creator-1", "creator")
    drop = await api_drop(http, token)
    auth = {"authorization": f"Bearer {token}"}
    r = await http.post(f"/v1/drops/{drop['id']}/giveaways", headers=auth,
                        json={"prize": "Backstage pass", "must_have_bought": True,
                              "duration_s": 60})
    assert r.status_code == 201, r.text
    viewer = await browsers.page("late", phone=True)
    await viewer.goto(f"{server.base_url}/d/{drop['id']}")
    await viewer.locator("#giveaway").wait_for(state="visible", timeout=15_000)
    assert await viewer.text_content("#gw-prize") == "Backstage pass"
    # Refused (buyers only): said on the page, which stays usable.
    await viewer.click("#gw-enter")
    await viewer.wait_for_function(
        "() => !document.getElementById('gw-error').hidden", timeout=10_000)
    assert "buyers" in await viewer.text_content("#gw-error")
    assert await viewer.locator("#gw-enter").is_enabled()
