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


def test_tallied_counts_reach_the_counter_on_flush():
    from prometheus_client import CollectorRegistry, Counter

    from dropserver.observability import flush_tallies, tally

    registry = CollectorRegistry()
    counter = Counter("tally_probe", "probe", registry=registry)

    def value() -> float | None:
        return registry.get_sample_value("tally_probe_total")

    tally(counter)
    tally(counter, 4)
    assert value() == 0  # batched: nothing written yet
    flush_tallies()
    assert value() == 5
    flush_tallies()  # nothing pending: nothing added twice
    assert value() == 5


def test_tallied_observations_reach_the_histogram_as_observe_would():
    from prometheus_client import CollectorRegistry, Histogram

    from dropserver.observability import flush_tallies, tally_observe

    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    batched = Histogram("obs_batched", "probe", buckets=buckets, registry=registry)
    direct = Histogram("obs_direct", "probe", buckets=buckets, registry=registry)
    # On a bound, between bounds, under the first, over the last (+Inf).
    amounts = [0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 0.0]

    def samples(name: str) -> dict[tuple, float]:
        return {(s.name.replace(name, ""), s.labels.get("le")): s.value
                for family in registry.collect() if family.name == name
                for s in family.samples if not s.name.endswith("_created")}

    for amount in amounts:
        tally_observe(batched, amount)
        direct.observe(amount)
    assert samples("obs_batched")[("_count", None)] == 0  # batched: nothing yet
    flush_tallies()
    assert samples("obs_batched") == samples("obs_direct")
    assert samples("obs_batched")[("_count", None)] == len(amounts)
    flush_tallies()  # nothing pending: nothing added twice
    assert samples("obs_batched") == samples("obs_direct")


async def test_tallies_are_flushed_every_second_without_a_scrape(server):
    import asyncio

    from prometheus_client import CollectorRegistry, Counter

    from dropserver.observability import tally

    registry = CollectorRegistry()
    counter = Counter("tally_timer_probe", "probe", registry=registry)
    tally(counter, 2)
    for _ in range(30):
        if registry.get_sample_value("tally_timer_probe_total") == 2:
            break
        await asyncio.sleep(0.1)
    assert registry.get_sample_value("tally_timer_probe_total") == 2


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


class _SlowRedis:
    """A Redis whose PING answers, but only after ``seconds`` (a busy node's)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def ping(self) -> bool:
        import asyncio

        await asyncio.sleep(self.seconds)
        return True


async def test_readyz_stays_ready_while_a_dependency_that_answered_is_slow(server, http):
    """A probe slower than 1 s is 'slow', still ready, while Redis answered one within
    the last 5 s (a node busy with a rejoin storm must not be taken out by every
    balancer check at once); a slow probe's late answer counts; never answered, or not
    for 5 s, is unready."""
    import asyncio

    from dropserver import app as app_module

    state = server.app.state
    good = state.redis
    state.ready_answered = {}
    try:
        state.redis = _SlowRedis(1.5)
        cold = await http.get("/readyz")  # nothing answered yet: not ready
        assert cold.status_code == 503 and cold.json()["checks"]["redis"].startswith(
            "TimeoutError")
        await asyncio.sleep(0.8)  # its PING answered late, and that counts
        slow = await http.get("/readyz")
        assert slow.status_code == 200, slow.text
        assert slow.json()["checks"] == {"redis": "slow", "postgres": "ok"}
        state.redis = _SlowRedis(3600)  # answers nothing any more
        await asyncio.sleep(1.0)  # the previous probe's late answer is in
        state.ready_answered["redis"] -= app_module.READY_SLOW_GRACE_S  # long ago
        late = await http.get("/readyz")
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
        state.redis = good
        assert (await http.get("/readyz")).status_code == 200
    finally:
        state.redis = good
