"""One rule for a field a request does not define: it is refused, everywhere.

Every JSON body (HTTP) and every client frame (WebSocket) names its fields; anything
else is an error naming the field (HTTP ``422 validation_failed``, a frame's
``invalid_field``, or the delegated command's ``validation_failed``), so a typo such as
``quantiy`` never turns silently into a default (docs/http-api.md, docs/protocol.md).
Stripe's webhook events are the one exception: their schema is Stripe's.
"""

from __future__ import annotations

import pytest

from dropserver.auth import Role
from tests.realtime_support import Client, create_drop

BOGUS = {"bogus": 1}


@pytest.fixture
async def ctx(server, http, make_token):
    creator = {"Authorization": f"Bearer {make_token('creator-1', Role.CREATOR)}"}
    viewer = {"Authorization": f"Bearer {make_token('viewer-1', Role.VIEWER)}"}
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "t", "products": [{"title": "p", "price": 100, "units": 5}]})
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    return {"creator": creator, "viewer": viewer, "drop": drop["id"],
            "product": drop["products"][0]["product_id"]}


HTTP_BODIES = [
    ("creator", "post", "/v1/drops", {"title": "t", "products": [
        {"title": "p", "price": 100, "units": 5}]}),
    ("creator", "patch", "/v1/drops/{drop}", {"title": "u"}),
    ("creator", "post", "/v1/drops/{drop}/schedule", {"starts_at": "2999-01-01T00:00:00Z"}),
    ("creator", "post", "/v1/drops/{drop}/live", {}),
    ("creator", "post", "/v1/drops/{drop}/pin", {"product_id": None}),
    ("creator", "post", "/v1/drops/{drop}/buy-now", {"product_id": "{product}"}),
    ("creator", "post", "/v1/drops/{drop}/close", {}),
    ("creator", "post", "/v1/drops/{drop}/end", {}),
    ("creator", "post", "/v1/drops/{drop}/stakes", {"investor_id": "inv-1", "amount": 5}),
    ("creator", "post", "/v1/drops/{drop}/settle", {}),
    ("viewer", "post", "/v1/drops/{drop}/buy", {"product_id": "{product}",
                                                "idempotency_key": "k-1"}),
    ("viewer", "post", "/v1/dev/orders/ord-1/confirm", {"payment_method": "pm_card_visa"}),
]


@pytest.mark.parametrize("who, method, path, body", HTTP_BODIES,
                         ids=[f"{m} {p}" for _, m, p, _ in HTTP_BODIES])
async def test_every_http_body_refuses_an_unknown_field(http, ctx, who, method, path, body):
    body = {k: ctx["product"] if v == "{product}" else v for k, v in body.items()}
    resp = await getattr(http, method)(path.format(**ctx), headers=ctx[who],
                                       json={**body, **BOGUS})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "validation_failed" and error["details"]["field"] == "bogus"


FRAMES = [
    ({"t": "ping"}, "invalid_field"),
    ({"t": "chat.send", "text": "hi"}, "invalid_field"),
    ({"t": "chat.delete", "message_id": "m"}, "invalid_field"),
    ({"t": "chat.mute", "user_id": "u"}, "invalid_field"),
    ({"t": "chat.ban", "user_id": "u"}, "invalid_field"),
    ({"t": "chat.unban", "user_id": "u"}, "invalid_field"),
    ({"t": "chat.slow", "seconds": 0}, "invalid_field"),
    ({"t": "refresh", "token": "not-checked-first"}, "invalid_field"),
    ({"t": "buy", "product_id": 1, "idempotency_key": "k"}, "validation_failed"),
    ({"t": "cancel_hold", "hold_id": "h"}, "validation_failed"),
]


async def test_every_frame_refuses_an_unknown_field(server, settings, make_token):
    drop_id, _ = await create_drop(settings.database_url)
    c = await Client.connect(server.ws_url, token=make_token("creator-1", Role.CREATOR))
    try:
        err = await c.request({"t": "join", "drop_id": drop_id, **BOGUS})
        assert (err["t"], err["code"], err["details"]) == (
            "error", "invalid_field", {"field": "bogus"})
        err = await c.request({"t": "join", "drop_id": drop_id,
                               "since": {"epoch": "e", "offset": 1, **BOGUS}})
        assert err["code"] == "invalid_field" and err["details"] == {"field": "since.bogus"}
        assert (await c.join(drop_id))["t"] == "joined"
        for frame, code in FRAMES:
            err = await c.request({**frame, **BOGUS})
            assert (err["t"], err["code"], err["details"]["field"]) == (
                "error", code, "bogus"), (frame, err)
            if code == "invalid_field":
                ok = await c.request(frame)  # the same frame without it is fine
                assert ok["t"] in ("pong", "reply", "error") and ok.get("code") != code
    finally:
        await c.close()
