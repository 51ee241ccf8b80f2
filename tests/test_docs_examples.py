"""The examples of docs/protocol.md and docs/http-api.md, taken literally, against a real
server: a client author copies them, so they must work as written.

Each example is read from its page (the code block after a heading or phrase), sent as
it is, and the answer is held against what the page shows: every field the page
shows must be there with a value of the same kind, and the fields a client acts on
(``t``, ``id``, ``event``, ``code``, ``recovered``, ``text``) must have the shown value.
Illustrative values (an epoch, a buyer number) are not compared. The ids the pages use
(drop 42, product 7) are made real by starting the id sequences there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import websockets

from dropserver.auth import Role
from tests.realtime_support import JSON, Client

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Compared by value: what a client acts on in a frame (the session's chat text is the
# point of its example), and an HTTP error's code.
FRAME_VALUES = frozenset({"t", "id", "event", "code", "recovered", "text"})
HTTP_VALUES = frozenset({"code"})


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


def block_after(text: str, marker: str) -> str:
    """The body of the first fenced code block after ``marker``."""
    start = text.index(marker)
    fence = text.index("```", start)
    body = text.index("\n", fence) + 1
    return text[body:text.index("```", body)]


def loose_json(text: str) -> Any:
    """A documented JSON value with elisions: ``{...}`` and ``[...anything...]`` are
    empty, a trailing ``, ...`` is dropped; ``"..."`` strings stay strings."""
    text = re.sub(r"\{\.\.\.\}", "{}", text)
    text = re.sub(r"\[\.\.\.[^\]]*\]", "[]", text)
    text = re.sub(r",\s*\.\.\.(?=\s*[}\]])", "", text)
    return json.loads(text)


def mismatches(real: Any, shown: Any, path: str = "$",
               values: frozenset[str] = FRAME_VALUES) -> list[str]:
    """How ``real`` differs from what the page shows (empty: it conforms); the fields
    named in ``values`` must have the shown value, the others a value of its kind."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [f"{path}: {type(real).__name__}, shown an object"]
        out = []
        for key, value in shown.items():
            if key not in real:
                out.append(f"{path}.{key}: shown, not sent")
            elif key in values and not isinstance(value, (dict, list)):
                if real[key] != value:
                    out.append(f"{path}.{key}: {real[key]!r}, shown {value!r}")
            else:
                out += mismatches(real[key], value, f"{path}.{key}", values)
        return out
    if isinstance(shown, list):
        if not isinstance(real, list):
            return [f"{path}: {type(real).__name__}, shown a list"]
        return mismatches(real[0], shown[0], f"{path}[0]", values) if shown and real else []
    if shown is None or real is None:  # a field that may be null
        return []
    if isinstance(shown, bool) or isinstance(real, bool):
        ok = isinstance(shown, bool) and isinstance(real, bool)
    elif isinstance(shown, (int, float)):
        ok = isinstance(real, (int, float))
    else:
        ok = isinstance(real, type(shown))
    return [] if ok else [f"{path}: {real!r}, shown {shown!r}"]


def same_fields(real: dict, shown: dict, what: str) -> None:
    assert set(real) == set(shown), (
        f"{what}: sent but not shown {sorted(set(real) - set(shown))}, "
        f"shown but not sent {sorted(set(shown) - set(real))}")


def session_steps(block: str) -> list[tuple[str, str]]:
    """``>`` lines (sent), ``<`` frames (received, continued on indented lines) and
    ``... connection drops ...``, in order."""
    steps: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line.startswith("> "):
            steps.append(("send", line[2:]))
        elif line.startswith("< "):
            steps.append(("recv", line[2:]))
        elif line.startswith(" ") and steps and steps[-1][0] == "recv":
            steps[-1] = ("recv", steps[-1][1] + line)
        elif "connection drops" in line:
            steps.append(("reconnect", ""))
    return steps


class Reader:
    """Frames as they arrive, matched against shown frames in any order (independent
    frames, e.g. ``viewers`` and a drop event, may come either way round)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: list[Any] = []
        self.last_pos: dict[str, Any] | None = None

    async def _more(self) -> None:
        message = await self.client.recv_message(10)
        for frame in message if isinstance(message, list) else [message]:
            if frame.get("t") in ("event", "skipped"):
                self.last_pos = frame["pos"]
        self.messages.append(message)

    async def expect(self, shown: Any) -> Any:
        """The first message (a batch when ``shown`` is a list) that conforms."""
        try:
            return await asyncio.wait_for(self._expect(shown), 15)
        except TimeoutError:
            raise AssertionError(f"never received {shown}; got {self.messages}") from None

    async def _expect(self, shown: Any) -> Any:
        while True:
            for i, message in enumerate(self.messages):
                if isinstance(shown, list):
                    ok = (isinstance(message, list) and len(message) == len(shown)
                          and all(not mismatches(m, s)
                                  for m, s in zip(message, shown, strict=True)))
                else:
                    ok = isinstance(message, dict) and not mismatches(message, shown)
                if ok:
                    return self.messages.pop(i)
            await self._more()


async def _ids_as_shown(database_url: str) -> None:
    """The next drop is 42 and its first product 7, the ids the pages use."""
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("ALTER SEQUENCE drops_id_seq RESTART WITH 42")
        await db.execute("ALTER SEQUENCE products_id_seq RESTART WITH 7")
    finally:
        await db.close()


async def test_http_examples_work_as_written(server, http, settings, make_token):
    api = _doc("http-api.md")
    creator = {"Authorization": f"Bearer {make_token('creator-1', Role.CREATOR)}"}
    await _ids_as_shown(settings.database_url)
    # The drop body, as shown.
    resp = await http.post("/v1/drops", headers=creator,
                           json=json.loads(block_after(api, "**Drop body**")))
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    assert (drop["id"], drop["products"][0]["product_id"]) == (42, 7)
    # The error format, with the example's own error (BUY NOW on a draft).
    resp = await http.post("/v1/drops/42/buy-now", headers=creator, json={"product_id": 7})
    assert resp.status_code == 409
    assert mismatches(resp.json(), json.loads(block_after(api, "Errors always look")),
                      values=HTTP_VALUES) == []
    # Schedule without starts_at: the drop has one from its body.
    for action, body in (("schedule", {}), ("live", {}), ("buy-now", {"product_id": 7})):
        resp = await http.post(f"/v1/drops/42/{action}", headers=creator, json=body)
        assert resp.status_code == 200, (action, resp.text)
    # The drop response (abridged) of a drop on sale.
    owner_view = (await http.get("/v1/drops/42", headers=creator)).json()
    assert mismatches(owner_view, json.loads(block_after(api, "**Drop response**")),
                      values=HTTP_VALUES) == []
    # The buy: the body shown inline, the Idempotency-Key header, the answer shown.
    section = api[api.index("**POST `/v1/drops/{id}/buy`.**"):]
    body = json.loads(re.search(r"Body `(\{.*?\})`", section, re.S).group(1))
    viewer = {"Authorization": f"Bearer {make_token('viewer-9', Role.VIEWER)}",
              "Idempotency-Key": "docs-1"}
    resp = await http.post("/v1/drops/42/buy", headers=viewer, json=body)
    assert resp.status_code == 201, resp.text
    answer = json.loads(block_after(section, "Answer:"))
    same_fields(resp.json(), answer, "buy answer")
    assert mismatches(resp.json(), answer, values=HTTP_VALUES) == []


async def test_the_documented_token_claims_are_the_ones_checked(server, http, settings):
    api = _doc("http-api.md")
    claims = json.loads(block_after(api, "### Tokens"))

    async def me(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = jwt.encode(payload, settings.effective_jwt_secret, algorithm="HS256")
        resp = await http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        return resp.status_code, resp.json()

    assert await me(claims) == (200, {"guest": False, "user_id": claims["sub"],
                                      "role": claims["role"], "name": claims["name"],
                                      "avatar_url": "", "moderator_of": []})
    # Optional claims have the documented defaults.
    bare = {k: claims[k] for k in ("sub", "aud", "exp")}
    assert await me(bare) == (200, {"guest": False, "user_id": claims["sub"],
                                    "role": "viewer", "name": claims["sub"],
                                    "avatar_url": "", "moderator_of": []})
    for required in ("sub", "aud", "exp"):
        status, body = await me({k: v for k, v in claims.items() if k != required})
        assert status == 401 and body["error"]["code"] == "token_invalid", required
    cases = [({"aud": "elsewhere"}, "token_wrong_audience"),
             ({"exp": int(time.time()) - 60}, "token_expired"),
             ({"role": "owner"}, "token_invalid"),
             ({"nbf": int(time.time()) + 3600}, "token_invalid")]
    for change, code in cases:
        status, body = await me({**claims, **change})
        assert status == 401 and body["error"]["code"] == code, change
    # Each code the table names is one the server sends.
    table = api[api.index("### Tokens"):api.index("## Platform")]
    assert set(re.findall(r"`(token_\w+)`", table)) == {
        "token_wrong_audience", "token_expired", "token_wrong_issuer", "token_invalid"}


async def test_the_example_session_runs_as_written(server, http, settings, make_token):
    proto = _doc("protocol.md")
    creator = {"Authorization": f"Bearer {make_token('creator-1', Role.CREATOR)}"}
    await _ids_as_shown(settings.database_url)
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "Sneaker drop", "starts_at": "2030-11-23T18:00:00Z",
        "products": [{"title": "Red", "price": 2500, "units": 300}]})
    assert resp.status_code == 201 and resp.json()["products"][0]["product_id"] == 7
    for action in ("schedule", "live"):
        assert (await http.post(f"/v1/drops/42/{action}", headers=creator,
                                json={})).status_code == 200
    token = make_token("viewer-1", Role.VIEWER, name="Ann")

    async def connect() -> Client:
        ws = await websockets.connect(f"{server.ws_url}/ws?token={token}",
                                      subprotocols=[JSON], compression=None,
                                      ping_interval=None)
        assert ws.subprotocol == JSON
        return Client(ws, JSON)

    client = await connect()
    reader = Reader(client)
    steps = session_steps(block_after(proto, "## Example session (JSON)"))
    assert [k for k, _ in steps].count("send") >= 4
    sold = False
    try:
        for kind, text in steps:
            if kind == "send":
                frame = json.loads(text)
                if "since" in frame:  # "keep the last position seen and send it"
                    frame["since"] = reader.last_pos
                    text = json.dumps(frame)
                await client.ws.send(text)
            elif kind == "recv":
                shown = loose_json(text)
                if "drop.buy_now" in text and not sold:  # the creator presses BUY NOW
                    resp = await http.post("/v1/drops/42/buy-now", headers=creator,
                                           json={"product_id": 7})
                    assert resp.status_code == 200, resp.text
                    sold = True
                await reader.expect(shown)
            else:
                await client.close()
                client = await connect()
                reader.client, reader.messages = client, []
        # A late joiner's snapshot has the fields shown, and no others.
        late = await Client.connect(server.ws_url, fmt=JSON)
        await late.ws.send(steps[0][1])  # the session's own join, as a new viewer
        joined = await late.recv_until(lambda f: f.get("t") == "joined")
        await late.close()
        shown = json.loads(block_after(proto, "### joined"))
        assert joined["id"] == shown["id"]
        assert mismatches(joined, shown, values=frozenset({"t", "recovered"})) == []
        same_fields(joined["snapshot"], shown["snapshot"], "snapshot")
        same_fields(joined["snapshot"]["drop"], shown["snapshot"]["drop"], "snapshot.drop")
        same_fields(joined["snapshot"]["products"][0], shown["snapshot"]["products"][0],
                    "snapshot.products[]")
        same_fields(joined["snapshot"]["chat"][0], shown["snapshot"]["chat"][0],
                    "snapshot.chat[]")
    finally:
        await client.close()
