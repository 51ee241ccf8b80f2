"""Moderators, pinned messages, reminders, the host and the share link in headless
Chromium against the real server: a moderator moderates from the viewer page, viewers
see it, the console shows the moderators and the log; a viewer asks to be reminded of
a scheduled drop and shares its link. Every test also fails on any console error or
failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop

pytestmark = pytest.mark.timeout(150)

OPEN = "() => document.getElementById('conn').dataset.state === 'open'"


async def test_a_moderator_pins_and_deletes_and_the_console_logs_it(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    creator = make_token("creator-1", "creator", name="Cleo")
    drop = await api_drop(http, creator)
    auth = {"authorization": f"Bearer {creator}"}
    assert (await http.put("/v1/creators/creator-1/moderators/mod-1",
                           headers=auth)).status_code == 201

    fan = await browsers.page("fan", phone=True)
    await fan.goto(f"{server.base_url}/d/{drop['id']}#token={make_token('fan-1', name='Fay')}")
    await fan.wait_for_function(OPEN, timeout=15_000)
    # The host, from the creator's token; a viewer has no moderation tools.
    assert await fan.text_content("#host-name") == "Cleo"
    assert await fan.locator("#mod-tools").is_hidden()
    for text in ("first!", "buy my stuff at spam.example"):
        await fan.fill("#chat-input", text)
        await fan.click("#chat-form button")
        await fan.wait_for_function(
            f"() => window.__dropState.chat.some((m) => m.text === {text!r})",
            timeout=10_000)
    assert await fan.locator("#chat-list button.mod").count() == 0

    mod = await browsers.page("moderator", phone=True)
    await mod.goto(f"{server.base_url}/d/{drop['id']}#token={make_token('mod-1', name='Mo')}")
    await mod.wait_for_function(OPEN, timeout=15_000)
    await mod.locator("#mod-tools").wait_for(state="visible", timeout=10_000)
    first = mod.locator("#chat-list li", has_text="first!")
    await first.locator("button[data-mod='pin']").click()
    # Everyone sees the pin (chat.pinned), the moderator can unpin it.
    await fan.locator("#chat-pinned").wait_for(state="visible", timeout=10_000)
    assert await fan.text_content("#chat-pinned-text") == "first!"
    assert await fan.locator("#chat-unpin").is_hidden()
    assert await mod.locator("#chat-unpin").is_visible()
    spam = mod.locator("#chat-list li", has_text="spam.example")
    await spam.locator("button[data-mod='delete']").click()
    await fan.wait_for_function(
        "() => !window.__dropState.chat.some((m) => m.text.includes('spam.example'))",
        timeout=10_000)
    await mod.select_option("#mod-slow", "30")
    await browsers.shot(mod, "moderator")
    await browsers.shot(fan, "fan-pinned")

    # The console: the moderators and the log of who did what.
    console = await browsers.page("console")
    await console.goto(f"{server.base_url}/console?drop={drop['id']}#token={creator}")
    await console.wait_for_selector("body[data-ready='1']")
    await console.wait_for_function(
        "() => document.querySelectorAll('#mod-log li').length >= 4", timeout=15_000)
    log = await console.locator("#mod-log li").all_text_contents()
    assert any("mod-1 pinned a message of fan-1" in line for line in log), log
    assert any("mod-1 deleted a message of fan-1" in line for line in log), log
    assert any("mod-1 set slow mode to 30 s" in line for line in log), log
    assert any("creator-1 appointed moderator mod-1" in line for line in log), log
    assert await console.locator("#mod-list li").all_text_contents() == ["mod-1Dismiss"]
    assert await console.text_content("#console-pinned-text") == "first!"
    assert await console.input_value("#console-slow") == "30"
    # The creator unpins from the console; the viewer's pin goes away.
    await console.click("#console-unpin")
    await fan.locator("#chat-pinned").wait_for(state="hidden", timeout=10_000)
    # Appointing from the console.
    await console.fill("#mod-user-input", "mod-2")
    await console.click("#mod-appoint-btn")
    await console.wait_for_function(
        "() => [...document.querySelectorAll('#mod-list li')]"
        ".some((li) => li.textContent.startsWith('mod-2'))", timeout=10_000)
    await browsers.shot(console, "console-moderation")


async def test_remind_me_and_share_on_a_scheduled_drop(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    creator = make_token("creator-1", "creator")
    drop = await api_drop(http, creator, steps=("schedule",))
    viewer_token = make_token("fan-1", name="Fay")
    page = await browsers.page("viewer", phone=True)
    await page.goto(f"{server.base_url}/d/{drop['id']}#token={viewer_token}")
    await page.wait_for_function(OPEN, timeout=15_000)
    await page.locator("#remind").wait_for(state="visible", timeout=10_000)
    assert await page.text_content("#remind-btn") == "Remind me"
    await page.click("#remind-btn")
    await page.wait_for_function(
        "() => document.getElementById('remind-btn').textContent.startsWith('Reminder set')",
        timeout=10_000)
    auth = {"authorization": f"Bearer {viewer_token}"}
    assert (await http.get(f"/v1/drops/{drop['id']}/reminder", headers=auth)).json()[
        "reminded"] is True
    # A reload remembers it (asked from the server, not the page).
    await page.reload()
    await page.wait_for_function(
        "() => document.getElementById('remind-btn').textContent.startsWith('Reminder set')",
        timeout=15_000)
    await page.click("#remind-btn")  # cancel
    await page.wait_for_function(
        "() => document.getElementById('remind-btn').textContent === 'Remind me'",
        timeout=10_000)
    assert (await http.get(f"/v1/drops/{drop['id']}/reminder", headers=auth)).json()[
        "reminded"] is False
    # Share: the drop's own address, ready to copy.
    await page.click("#share-btn")
    await page.locator("#share").wait_for(state="visible", timeout=5_000)
    assert await page.input_value("#share-link") == f"{server.base_url}/d/{drop['id']}"
    await page.wait_for_function(
        "() => document.getElementById('share-status').textContent !== ''", timeout=5_000)
    await browsers.shot(page, "viewer-remind-share")


async def test_a_moderator_bans_from_the_viewer_page_and_can_undo_it(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    """Ban sits beside Mute on a viewer's message (never on the staff's): the author's
    next message is refused in this drop and the creator's others; Undo lifts it."""
    from tests.realtime_support import Client

    creator = make_token("creator-1", "creator", name="Cleo")
    drop = await api_drop(http, creator)
    other = await api_drop(http, creator, title="Next drop")
    assert (await http.put("/v1/creators/creator-1/moderators/mod-1", headers={
        "authorization": f"Bearer {creator}"})).status_code == 201
    troll = await Client.connect(server.ws_url, token=make_token("troll", name="Troll"))
    assert (await troll.join(drop["id"]))["t"] == "joined"
    host = await Client.connect(server.ws_url, token=creator)
    assert (await host.join(drop["id"]))["t"] == "joined"
    assert (await troll.request({"t": "chat.send", "text": "spam"}))["t"] == "reply"
    assert (await host.request({"t": "chat.send", "text": "welcome"}))["t"] == "reply"

    mod = await browsers.page("moderator", phone=True)
    await mod.goto(f"{server.base_url}/d/{drop['id']}#token={make_token('mod-1', name='Mo')}")
    await mod.wait_for_function(OPEN, timeout=15_000)
    spam = mod.locator("#chat-list li", has_text="spam")
    await spam.locator("button[data-mod='ban']").wait_for(timeout=10_000)
    assert await spam.locator("button.mod").all_inner_texts() == ["Pin", "Delete", "Mute",
                                                                   "Ban"]
    welcome = mod.locator("#chat-list li", has_text="welcome")
    assert await welcome.locator("button.mod").all_inner_texts() == ["Pin", "Delete"]
    await spam.locator("button[data-mod='ban']").click()
    await mod.wait_for_function(
        "() => document.getElementById('mod-status').textContent"
        ".startsWith('Troll banned until lifted')", timeout=10_000)
    assert (await troll.request({"t": "chat.send", "text": "x"}))["code"] == "banned"
    elsewhere = await Client.connect(server.ws_url, token=make_token("troll", name="Troll"))
    assert (await elsewhere.join(other["id"]))["t"] == "joined"
    assert (await elsewhere.request({"t": "chat.send", "text": "x"}))["code"] == "banned"
    audit = (await http.get(f"/v1/drops/{drop['id']}/moderation", headers={
        "authorization": f"Bearer {creator}"})).json()["actions"]
    assert (audit[0]["action"], audit[0]["user_id"], audit[0]["moderator_id"]) == (
        "ban", "troll", "mod-1")
    await browsers.shot(mod, "moderator-ban")
    await mod.click("#mod-undo")
    await mod.wait_for_function(
        "() => document.getElementById('mod-status').textContent === 'Troll may chat again'",
        timeout=10_000)
    assert (await troll.request({"t": "chat.send", "text": "sorry"}))["t"] == "reply"
    for c in (troll, host, elsewhere):
        await c.close()
