"""The creator moderates the chat from the console, in headless Chromium against the
real server: each message with Pin, Delete, Mute and Ban (not on the staff's own
messages), a message written from the console, the audit with who did what, and a ban
lifted from the log. The viewers are real sockets (tests/realtime_support.py). Every
test also fails on any console error or failed load (tests/e2e/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import Browsers, api_drop
from tests.realtime_support import Client

pytestmark = pytest.mark.timeout(150)


async def test_the_creator_moderates_each_message_from_the_console(
        server: RunningServer, browsers: Browsers, http, make_token) -> None:
    creator = make_token("creator-1", "creator", name="Cleo")
    drop = await api_drop(http, creator)
    drop_id = drop["id"]
    assert (await http.put("/v1/creators/creator-1/moderators/mod-1", headers={
        "authorization": f"Bearer {creator}"})).status_code == 201

    console = await browsers.page("console")
    await console.goto(f"{server.base_url}/console?drop={drop_id}#token={creator}")
    await console.wait_for_function(
        "() => document.getElementById('conn').dataset.state === 'open'", timeout=20_000)

    people = {}
    for user, name in (("fan-1", "Fay"), ("troll", "Troll"), ("mod-1", "Mo")):
        c = await Client.connect(server.ws_url, token=make_token(user, name=name))
        assert (await c.join(drop_id))["t"] == "joined"
        people[user] = c
    fan, troll, mod = people["fan-1"], people["troll"], people["mod-1"]
    for who, text in ((fan, "hello"), (troll, "spam spam"), (troll, "more spam"),
                      (mod, "be nice")):
        reply = await who.request({"t": "chat.send", "text": text})
        assert reply["t"] == "reply", reply

    chat = console.locator("#console-chat li")
    await console.wait_for_function(
        "() => document.querySelectorAll('#console-chat li').length === 4", timeout=15_000)
    assert [await li.locator(".text").text_content() for li in await chat.all()] == [
        "hello", "spam spam", "more spam", "be nice"]

    def message(text: str):
        return console.locator("#console-chat li", has_text=text)

    # The staff's own messages: pin and delete, never mute or ban.
    assert await message("be nice").locator("button").all_inner_texts() == ["Pin", "Delete"]
    assert await message("hello").locator("button").all_inner_texts() == [
        "Pin", "Delete", "Mute", "Ban"]

    # Write to the room from the console: the viewers see the creator's message.
    await console.fill("#console-chat-input", "welcome, all")
    await console.click("#console-chat-form button")
    said = await fan.recv_until(lambda f: f.get("event") == "chat.message"
                                and f["data"]["text"] == "welcome, all")
    assert said["data"]["role"] == "creator" and said["data"]["name"] == "Cleo"
    await message("welcome, all").wait_for(timeout=10_000)
    assert await message("welcome, all").locator("button").all_inner_texts() == [
        "Pin", "Delete"]

    # Pin one, delete another: every viewer hears it.
    await message("hello").locator("button[data-mod='pin']").click()
    pinned = await fan.recv_until(lambda f: f.get("event") == "chat.pinned")
    assert pinned["data"]["text"] == "hello" and pinned["data"]["pinned_by"] == "creator-1"
    await console.locator("#console-pinned").wait_for(state="visible", timeout=10_000)
    assert await console.text_content("#console-pinned-text") == "hello"
    await message("spam spam").locator("button[data-mod='delete']").click()
    await fan.recv_until(lambda f: f.get("event") == "chat.deleted")
    await console.wait_for_function(
        "() => ![...document.querySelectorAll('#console-chat li .text')]"
        ".some((t) => t.textContent === 'spam spam')", timeout=10_000)

    # Mute one author, ban another: the server refuses their next messages.
    await message("hello").locator("button[data-mod='mute']").click()
    await console.wait_for_function(
        "() => document.getElementById('console-chat-status').textContent"
        " === 'fan-1 muted for 10 minutes'", timeout=10_000)
    assert (await fan.request({"t": "chat.send", "text": "x"}))["code"] == "muted"
    await message("more spam").locator("button[data-mod='ban']").click()
    await console.wait_for_function(
        "() => document.getElementById('console-chat-status').textContent"
        " === 'troll banned until lifted'", timeout=10_000)
    assert (await troll.request({"t": "chat.send", "text": "x"}))["code"] == "banned"

    # The audit: who did what, newest first; the mute and the ban can be lifted there.
    await console.wait_for_function(
        "() => document.querySelector('#mod-log li')?.dataset.kind === 'ban'",
        timeout=10_000)
    lines = await console.locator("#mod-log li").all_text_contents()
    for expected in ("creator-1 banned troll", "creator-1 muted fan-1",
                     "creator-1 deleted a message of troll",
                     "creator-1 pinned a message of fan-1",
                     "creator-1 appointed moderator mod-1"):
        assert any(expected in line for line in lines), (expected, lines)
    assert await console.locator("#mod-log li button[data-mod='unban']").count() == 2
    await browsers.shot(console, "console-chat-moderation")
    await console.locator("#mod-log li[data-kind='ban'] button[data-mod='unban']").click()
    await console.wait_for_function(
        "() => document.querySelector('#mod-log li')?.dataset.kind === 'unban'",
        timeout=10_000)
    assert (await troll.request({"t": "chat.send", "text": "sorry"}))["t"] == "reply"
    assert await console.locator("#mod-log li[data-kind='ban'] button").count() == 0
    assert (await fan.request({"t": "chat.send", "text": "x"}))["code"] == "muted"
    for c in people.values():
        await c.close()
