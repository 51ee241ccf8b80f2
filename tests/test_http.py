"""Health, readiness, metrics, error bodies and request ids."""


async def test_healthz(http):
    resp = await http.get("/healthz")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"


async def test_readyz_checks_redis_and_postgres(http):
    resp = await http.get("/readyz")
    assert resp.status_code == 200
    assert resp.json()["checks"] == {"redis": "ok", "postgres": "ok"}


async def test_readyz_is_503_when_redis_is_gone(server, http):
    import redis.asyncio as aioredis

    state = server.app.state
    good = state.redis
    state.redis = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        resp = await http.get("/readyz")
    finally:
        await state.redis.aclose()
        state.redis = good
    assert resp.status_code == 503
    body = resp.json()
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"] != "ok"
    assert body["error"]["code"] == "unavailable"


async def test_metrics_are_prometheus_text(http):
    resp = await http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in resp.text


async def test_unknown_path_has_json_error_body(http):
    resp = await http.get("/no/such/thing")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "Not Found",
                                     "details": {}}}


async def test_wrong_method_has_json_error_body(http):
    resp = await http.post("/healthz")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"


async def test_request_id_is_echoed_or_made(http):
    given = await http.get("/healthz", headers={"X-Request-ID": "abc123"})
    assert given.headers["x-request-id"] == "abc123"
    made = await http.get("/healthz")
    assert made.headers["x-request-id"].startswith("r-")
