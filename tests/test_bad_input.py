"""Odd input gets a documented 4xx with the JSON error body, never a 500: each case
reported from outside, then the same mistake found elsewhere (every id in a path,
every text that reaches PostgreSQL or Redis)."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from dropserver.auth import Role
from tests.conftest import start_server

CREATOR = "creator-odd"
PRODUCT = {"title": "Hoodie", "price": 4500, "units": 3}
BIG = "100000000000000000000"          # 10^20: past PostgreSQL's bigint
TWO_64 = str(2**64)
SUPERSCRIPT_TWO = "\u00b2"             # str.isdigit() says yes, int() says no


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


@pytest.fixture
def creator(make_token):
    return bearer(make_token(CREATOR, Role.CREATOR))


@pytest.fixture
def viewer(make_token):
    return bearer(make_token("viewer-odd", Role.VIEWER))


async def _drop(http, creator) -> int:
    resp = await http.post("/v1/drops", json={"title": "odd", "products": [PRODUCT]},
                           headers=creator)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


# -- what was reported ------------------------------------------------------------------

async def test_a_json_body_nested_100000_deep_is_400(http, creator):
    body = "[" * 100_000 + "]" * 100_000
    resp = await http.post("/v1/drops", content=body, headers={
        **creator, "content-type": "application/json"})
    assert error_of(resp, 400)["code"] == "malformed_json"


@pytest.mark.parametrize("title", ["a\u0000b", "\ud800", "ok \udfff"])
async def test_nul_or_a_lone_surrogate_in_a_title_is_422(http, creator, title):
    import json

    # json.dumps escapes the lone surrogate (\ud800) as JSON allows.
    body = json.dumps({"title": title, "products": [PRODUCT]})
    resp = await http.post("/v1/drops", content=body, headers={
        **creator, "content-type": "application/json"})
    err = error_of(resp, 422)
    assert err["code"] == "validation_failed" and err["details"]["field"] == "title"


async def test_a_start_past_the_last_representable_time_is_422(http, creator):
    drop_id = await _drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/schedule",
                           json={"starts_at": "9999-12-31T23:59:59-01:00"}, headers=creator)
    err = error_of(resp, 422)
    assert err["details"]["field"] == "starts_at"
    resp = await http.post("/v1/drops", headers=creator, json={
        "title": "c", "kind": "campaign", "products": [PRODUCT],
        "campaign": {"goal_orders": 1, "deadline": "9999-12-31T23:59:59-01:00"}})
    assert error_of(resp, 422)["details"]["field"] == "campaign.deadline"


@pytest.mark.parametrize("path", [
    f"/v1/drops/{BIG}/stakes", f"/v1/drops/{BIG}/settlement", f"/v1/drops/{BIG}",
    f"/v1/drops/{BIG}/stats", f"/v1/drops/{BIG}/transitions", f"/v1/drops/{BIG}/stream",
    f"/v1/drops/{BIG}/replay", f"/v1/drops/{BIG}/hls/live.m3u8",
    f"/v1/drops/{SUPERSCRIPT_TWO}/hls/live.m3u8", f"/v1/drops/{SUPERSCRIPT_TWO}/stream",
    f"/v1/drops/{SUPERSCRIPT_TWO}/replay", f"/v1/drops/{SUPERSCRIPT_TWO}/stakes",
    f"/v1/drops/{SUPERSCRIPT_TWO}", "/v1/drops/%20%207/stakes", "/v1/drops/1_000/stakes",
    f"/d/{BIG}",
])
async def test_an_id_that_cannot_exist_is_404(http, creator, path):
    resp = await http.get(path, headers=creator)
    assert error_of(resp, 404)["code"] in ("not_found", "drop_not_found")


@pytest.mark.parametrize("path", [f"/v1/drops/{TWO_64}/buy", f"/v1/drops/{BIG}/buy",
                                  f"/v1/drops/{SUPERSCRIPT_TWO}/buy"])
async def test_a_buy_in_a_drop_that_cannot_exist_is_404(http, viewer, path):
    resp = await http.post(path, json={"product_id": 1}, headers={
        **viewer, "Idempotency-Key": "odd-1"})
    assert error_of(resp, 404)["code"] in ("not_found", "drop_not_found")


@pytest.mark.parametrize("method, path", [
    ("POST", f"/v1/drops/{BIG}/whip"), ("POST", f"/v1/drops/{SUPERSCRIPT_TWO}/whip"),
    ("DELETE", f"/v1/drops/{SUPERSCRIPT_TWO}/whip/abc"),
    ("POST", f"/v1/drops/{BIG}/stakes"), ("POST", f"/v1/drops/{BIG}/settle"),
    ("POST", f"/v1/drops/{BIG}/live"), ("PATCH", f"/v1/drops/{BIG}"),
])
async def test_writes_to_an_id_that_cannot_exist_are_404(http, creator, method, path):
    resp = await http.request(method, path, headers=creator, json={})
    assert error_of(resp, 404)["code"] in ("not_found", "drop_not_found")


@pytest.mark.parametrize("path", ["/static/js/%00.js", "/static/%00", "/static/css/a%00b",
                                  "/v1/holds/%00", "/v1/holds/1-1-%00"])
async def test_a_nul_in_a_path_is_4xx(http, viewer, path):
    resp = await http.get(path, headers=viewer)
    assert error_of(resp, resp.status_code)  # JSON body
    assert resp.status_code in (400, 404)


# -- siblings: query strings, headers and body fields that reach PostgreSQL or Redis --------

@pytest.mark.parametrize("query, field", [
    ({"limit": SUPERSCRIPT_TWO}, "limit"), ({"before": SUPERSCRIPT_TWO}, "before"),
    ({"before": BIG}, "before"), ({"creator": "a\u0000b"}, "creator"),
])
async def test_odd_list_queries_are_4xx(http, query, field):
    resp = await http.get("/v1/drops", params=query)
    err = error_of(resp, resp.status_code)
    assert resp.status_code in (400, 422), resp.text
    assert err["details"].get("field") in (field, None)


async def test_an_odd_if_match_is_422(http, creator):
    drop_id = await _drop(http, creator)
    resp = await http.patch(f"/v1/drops/{drop_id}", json={"title": "x"},
                            headers={**creator, "If-Match": b'"\xb2"'})  # latin-1 "²"
    assert error_of(resp, 422)["details"]["field"] == "If-Match"


@pytest.mark.parametrize("action, body, field", [
    ("pin", {"product_id": 2**64}, "product_id"),
    ("buy-now", {"product_id": 2**64}, "product_id"),
    ("close", {"product_id": 2**64}, "product_id"),
])
async def test_product_ids_past_bigint_are_422(http, creator, action, body, field):
    drop_id = await _drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/{action}", json=body, headers=creator)
    assert error_of(resp, 422)["details"]["field"] == field


async def test_patch_with_a_product_id_past_bigint_is_422(http, creator):
    drop_id = await _drop(http, creator)
    resp = await http.patch(f"/v1/drops/{drop_id}", headers=creator, json={
        "products": [{**PRODUCT, "product_id": 2**64}]})
    assert error_of(resp, 422)["details"]["field"] == "products[0].product_id"


@pytest.mark.parametrize("body, field", [
    ({"investor_id": "inv\u0000", "amount": 10}, "investor_id"),
    ({"investor_id": "\ud800", "amount": 10}, "investor_id"),
    ({"investor_id": "inv", "amount": 10, "stripe_account_id": "acct_\u0000"},
     "stripe_account_id"),
])
async def test_stake_text_with_nul_or_surrogates_is_422(http, creator, body, field):
    import json

    drop_id = await _drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/stakes", content=json.dumps(body),
                           headers={**creator, "content-type": "application/json"})
    assert error_of(resp, 422)["details"]["field"] == field


@pytest.mark.parametrize("body, field", [
    ({"product_id": 1, "idempotency_key": "k", "flow": "\ud800"}, "flow"),
    ({"product_id": 1, "idempotency_key": "\u0000"}, "idempotency_key"),
])
async def test_buy_text_with_nul_or_surrogates_is_422(http, viewer, creator, body, field):
    import json

    drop_id = await _drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/buy", content=json.dumps(body),
                           headers={**viewer, "content-type": "application/json"})
    assert error_of(resp, 422)["details"]["field"] == field


async def test_a_stake_with_an_unknown_field_is_422(http, creator):
    drop_id = await _drop(http, creator)
    resp = await http.post(f"/v1/drops/{drop_id}/stakes", headers=creator, json={
        "investor_id": "inv", "amount": 10, "amout": 20})
    assert error_of(resp, 422)["details"]["field"] == "amout"


async def test_dev_confirm_of_an_order_id_with_nul_is_404(http, viewer):
    resp = await http.post("/v1/dev/orders/%00/confirm", json={}, headers=viewer)
    assert resp.status_code in (400, 404)
    error_of(resp, resp.status_code)


# -- an outage is 503, not 500 ----------------------------------------------------------

async def test_dev_confirm_while_postgres_is_down_is_503(settings, make_token, tmp_path):
    """PostgreSQL stopped for real (its own instance): an outage is a 503 with the JSON
    body and Retry-After, which a client retries; not a 500 (a bug)."""
    from dropserver.services import LocalServices

    with LocalServices(want_redis=False) as pg:
        from tests.conftest import _prepare_db

        await _prepare_db(pg.database_url)
        srv, stop = await start_server(settings.replace(database_url=pg.database_url))
        try:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=20) as client:
                headers = bearer(make_token("viewer-odd"))
                ok = await client.post("/v1/dev/orders/1-1-abc/confirm", json={},
                                       headers=headers)
                assert error_of(ok, 404)["code"] == "order_not_found"
                # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for the clients).
                pg._procs["postgres"].send_signal(signal.SIGINT)
                await asyncio.to_thread(pg._procs["postgres"].wait, 10)
                resp = await client.post("/v1/dev/orders/1-1-abc/confirm", json={},
                                         headers=headers)
                assert error_of(resp, 503)["code"] == "unavailable"
                assert resp.headers["retry-after"]
                ready = await client.get("/readyz")
                assert ready.status_code == 503
        finally:
            await stop()


# -- the same over the socket: an error frame, never internal_error ----------------------

@pytest.mark.parametrize("frame", [
    {"t": "chat.send", "text": "hi \ud800"},
    {"t": "chat.send", "text": "nul \u0000 here"},
    {"t": "buy", "product_id": 1, "idempotency_key": "k", "flow": "\ud800"},
    {"t": "cancel_hold", "hold_id": "\ud800"},
])
async def test_odd_text_over_the_socket_is_an_error_frame(server, make_token, frame):
    from tests.realtime_support import JSON, Client, create_drop

    drop_id, _ = await create_drop(server.app.state.settings.database_url)
    client = await Client.connect(server.ws_url, fmt=JSON, token=make_token("viewer-odd"))
    try:
        joined = await client.request({"t": "join", "drop_id": drop_id})
        assert joined["t"] == "joined"
        answer = await client.request(frame)
        if answer["t"] == "error":
            assert answer["code"] != "internal_error", answer
        # and the connection lives
        assert (await client.request({"t": "ping"}))["t"] == "pong"
    finally:
        await client.ws.close()


async def test_a_token_whose_subject_is_not_text_is_401(http, settings):
    from dropserver.auth import issue_token

    token = issue_token(settings, "viewer\u0000x", Role.VIEWER)
    resp = await http.get("/v1/me", headers=bearer(token))
    assert error_of(resp, 401)["code"] == "token_invalid"
