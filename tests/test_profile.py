"""The host of a drop as pages show them (name, avatar), and /v1/me's profile."""

from __future__ import annotations

import time

import jwt

from tests.realtime_support import Client


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _token(settings, sub: str, role: str, **claims) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, settings.jwt_role_claim: role, "aud": settings.jwt_audience,
                       "iat": now, "exp": now + 3600, **claims},
                      settings.effective_jwt_secret, algorithm="HS256")


_DROP = {"title": "Friday drop", "products": [{"title": "Hoodie", "price": 4500,
                                               "units": 10}]}


async def test_the_host_comes_from_the_token_and_the_profile(server, http, settings,
                                                             make_token):
    mia = _auth(_token(settings, "creator-9", "creator", name="Mia",
                       picture="https://cdn.example/mia.jpg"))
    created = await http.post("/v1/drops", json=_DROP, headers=mia)
    assert created.status_code == 201, created.text
    drop = created.json()
    assert drop["host"] == {"id": "creator-9", "name": "Mia",
                            "avatar_url": "https://cdn.example/mia.jpg"}
    drop_id = drop["id"]
    starts = "2099-01-01T18:00:00Z"
    assert (await http.post(f"/v1/drops/{drop_id}/schedule", json={"starts_at": starts},
                            headers=mia)).status_code == 200
    # A guest sees the host, over HTTP and in the join snapshot.
    public = (await http.get(f"/v1/drops/{drop_id}")).json()
    assert public["host"]["name"] == "Mia"
    c = await Client.connect(server.ws_url)
    snap = (await c.join(drop_id))["snapshot"]
    assert snap["drop"]["host"] == {"id": "creator-9", "name": "Mia",
                                    "avatar_url": "https://cdn.example/mia.jpg"}
    await c.close()
    # PATCH /v1/me changes it; a token without the claims leaves it alone.
    changed = await http.patch("/v1/me", json={"display_name": " Mia K ",
                                               "avatar_url": "/static/img/mia.png"},
                               headers=mia)
    assert changed.status_code == 200, changed.text
    assert changed.json() == {"user_id": "creator-9", "display_name": "Mia K",
                              "avatar_url": "/static/img/mia.png"}
    plain = _auth(make_token("creator-9", "creator"))
    assert (await http.patch(f"/v1/drops/{drop_id}", json={"description": "x"},
                             headers=plain)).status_code == 200
    host = (await http.get(f"/v1/drops/{drop_id}")).json()["host"]
    assert host == {"id": "creator-9", "name": "Mia K", "avatar_url": "/static/img/mia.png"}
    me = (await http.get("/v1/me", headers=plain)).json()
    assert me["avatar_url"] == "/static/img/mia.png" and me["moderator_of"] == []


async def test_me_lists_what_the_caller_moderates_and_refuses_bad_profiles(http, make_token):
    creator = _auth(make_token("creator-1", "creator"))
    await http.put("/v1/creators/creator-1/moderators/mod-1", headers=creator)
    me = (await http.get("/v1/me", headers=_auth(make_token("mod-1")))).json()
    assert me["moderator_of"] == ["creator-1"]
    assert (await http.get("/v1/me")).json() == {"guest": True, "user_id": None,
                                                 "role": None}
    mod = _auth(make_token("mod-1"))
    for body, field in (({}, "body"), ({"display_name": "   "}, "display_name"),
                        ({"display_name": "x" * 81}, "display_name"),
                        ({"avatar_url": "javascript:alert(1)"}, "avatar_url"),
                        ({"avatar_url": 5}, "avatar_url"), ({"nick": "x"}, "nick"),
                        # null is a wrong type, not "leave it" (the deep fuzz found it)
                        ({"avatar_url": None, "display_name": "0"}, "avatar_url"),
                        ({"display_name": None}, "display_name")):
        resp = await http.patch("/v1/me", json=body, headers=mod)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["error"]["details"]["field"] == field
    assert (await http.patch("/v1/me", json={"display_name": "x"})).status_code == 401
