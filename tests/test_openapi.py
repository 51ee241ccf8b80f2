"""The OpenAPI 3.1 document (dropserver/openapi.py): it names every route and only
routes that exist, and a running server answers as it says under schemathesis."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import httpx
import pytest

from dropserver import openapi
from dropserver.auth import Role
from tests.conftest import running

CREATOR = "creator-fuzz"


def _app(settings):
    from dropserver.app import create_app

    return create_app(settings)


def test_every_route_is_documented_and_every_operation_is_a_route(settings):
    app = _app(settings)  # dev: every route mounted
    routes = openapi.route_operations(app.routes)
    every = {(m, r.path) for r in app.routes for m in getattr(r, "methods", None) or ()}
    assert openapi.REFUSALS <= every  # the refusals are routes, left out on purpose
    assert routes - set(openapi.OPERATIONS) == set(), "routes missing from the document"
    assert set(openapi.OPERATIONS) - routes == set(), "documented operations with no route"


def test_production_documents_no_dev_route(settings):
    prod = settings.replace(dev=False, jwt_secret="s" * 32, payment_gateway="stripe",
                            stripe_api_key="sk_x", stripe_webhook_secret="whsec_x")
    doc = openapi.document(_app(prod).routes)
    assert doc["openapi"].startswith("3.1")
    assert "/v1/drops/{drop_id}/buy" in doc["paths"]
    assert not [p for p in doc["paths"] if p.startswith("/v1/dev/")]


_ROW = re.compile(r"\|\s*(GET|POST|PUT|PATCH|DELETE|OPTIONS)\s*\|\s*`(/[^`]*)`")
_INLINE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE|OPTIONS) (/[^`]*)`")


def _page_operations() -> set[tuple[str, str]]:
    """(method, path) of every endpoint docs/http-api.md lists, spelled as routes are."""
    page = (Path(__file__).parents[1] / "docs" / "http-api.md").read_text()
    found = set()
    for method, path in _ROW.findall(page) + _INLINE.findall(page):
        path = path.split("?")[0].replace("{id}", "{drop_id}")
        path = path.replace("{session}", "{session_id}")
        path = re.sub(r"/hls/.*$", "/hls/{name}", path)
        found.add((method, path))
    return found


def test_the_http_api_page_and_the_document_name_the_same_operations(settings):
    doc = openapi.document(_app(settings).routes)
    documented = {(m.upper(), path) for path, item in doc["paths"].items()
                  for m in item if m != "parameters"}
    refusals = {(m, p.replace(":id", "")) for m, p in openapi.REFUSALS}
    page = _page_operations() - refusals
    assert documented - page == set(), "in /openapi.json, not in docs/http-api.md"
    assert page - documented == set(), "in docs/http-api.md, not in /openapi.json"


async def test_the_document_is_served_and_valid(http):
    resp = await http.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"] == "3.1.0"
    import schemathesis

    schema = schemathesis.openapi.from_dict(doc)  # refuses an invalid document
    assert len(list(schema.get_all_operations())) == sum(
        1 for methods in doc["paths"].values() for m in methods if m != "parameters")


async def _selling_drop(base_url: str, token: str) -> int:
    from datetime import UTC, datetime, timedelta

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as c:
        drop = (await c.post("/v1/drops", json={"title": "fuzz", "products": [
            {"title": "Tee", "price": 2500, "units": 1000, "per_buyer_limit": 100}]})).json()
        when = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        for action, body in (("schedule", {"starts_at": when}), ("live", {}),
                             ("buy-now", {"product_id": drop["products"][0]["product_id"]})):
            resp = await c.post(f"/v1/drops/{drop['id']}/{action}", json=body)
            assert resp.status_code == 200, resp.text
        return drop["id"]


async def fuzz(base_url: str, token: str, tmp_path: Path, *, max_examples: int,
               phases: str) -> tuple[int, str]:
    """``st run`` against the running server; returns its exit code and output."""
    st = Path(sys.executable).with_name("st")
    argv = [str(st), "run", f"{base_url}/openapi.json",
            "--checks", "all",
            # A valid body for a drop that is not there, or a hold that was never made,
            # is refused (404/409): positive data cannot be "accepted" without state.
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(max_examples), "--phases", phases,
            # One worker: with two threads, CPython 3.11's ast constructor (hypothesis
            # parses the source of its filters' lambdas) can raise "AST constructor
            # recursion depth mismatch" (python/cpython#106905), failing the run.
            "--seed", "7", "--workers", "1",
            "--request-timeout", "10", "--suppress-health-check", "all",
            "-H", f"Authorization: Bearer {token}",
            "--report", "junit", "--report-dir", str(tmp_path / "st"),
            "--output-truncate", "false"]
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        cwd=tmp_path)
    out, _ = await proc.communicate()
    return proc.returncode, out.decode(errors="replace")


# As production runs: a webhook secret (without one the webhook is 503 not_configured).
_FUZZED = {"stripe_webhook_secret": "whsec_fuzz"}


@pytest.mark.timeout(600)
async def test_fuzz_fast_no_500_and_every_answer_as_documented(settings, make_token,
                                                              tmp_path):
    """The default run's budget (~200 requests, well under a minute on a 2-core VM):
    the schema's examples and a few generated cases per operation."""
    token = make_token(CREATOR, Role.CREATOR)
    async with running(settings, **_FUZZED) as srv:
        await _selling_drop(srv.base_url, token)
        rc, out = await fuzz(srv.base_url, token, tmp_path, max_examples=5,
                             phases="examples,fuzzing")
    assert rc == 0, out[-20000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_fuzz_deep(settings, make_token, tmp_path):
    """The slow run: also the coverage phase (boundary and invalid values of every
    keyword) and the stateful one (create a drop, then act on it through the links):
    ~5 minutes on a 2-core VM."""
    token = make_token(CREATOR, Role.CREATOR)
    async with running(settings, **_FUZZED) as srv:
        await _selling_drop(srv.base_url, token)
        rc, out = await fuzz(srv.base_url, token, tmp_path, max_examples=30,
                             phases="examples,coverage,fuzzing,stateful")
    assert rc == 0, out[-20000:]
