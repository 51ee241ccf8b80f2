"""Headless Chromium for the end-to-end tests: Debian's ``/usr/bin/chromium`` driven by
Playwright (never ``playwright install``). Each page gets its own browser with a fresh
``--user-data-dir``; the console's browser has a fake camera and microphone.

Every page must run clean: a console message of type ``error``, an uncaught page
error, a failed request or an HTTP answer >= 400 on any page fails the test (checked
when the ``browsers`` fixture closes, so no test can forget it). The exceptions:
hls.js cancelling an HLS request of its own (``net::ERR_ABORTED``: it replaces a blocking
playlist reload with a newer one), which is how an LL-HLS client works; and a blocking
playlist reload answered 503 while the publisher sent nothing (the camera is this
machine's Chromium, which a loaded machine starves), as the server itself counted it
(``dropserver_hls_blocking_timeouts_total{publisher="silent"}``). A 503 the server
counted while media came in (``sending``) is the server's stall and fails the test,
however few; so does any 503 the pages saw beyond the server's silent ones.

Screenshots and each page's console log are kept under ``artifacts/e2e/<test>/``
(``DROPSERVER_E2E_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DROPSERVER_CHROMIUM", "/usr/bin/chromium")

BASE_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
]
CAMERA_ARGS = ["--use-fake-device-for-media-stream=fps=30", "--use-fake-ui-for-media-stream"]

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 900}}


def chromium_or_skip() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not path:
        pytest.skip(f"Chromium not installed at {CHROMIUM} "
                    "(apt-get install chromium; .ci/run installs it as root)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return path


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    base = Path(os.environ.get("DROPSERVER_E2E_ARTIFACTS", ROOT / "artifacts" / "e2e"))
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    folder = base / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder




def _blocking_timeouts() -> dict[str, float]:
    """The in-process server's blocking reloads answered 503, by publisher label."""
    from streaming.hls import BLOCKING_TIMEOUTS

    return {p: BLOCKING_TIMEOUTS.labels(p)._value.get()
            for p in ("silent", "sending", "elsewhere")}


def _blocking_reload(url: str) -> bool:
    return "/hls/live.m3u8" in url and "_HLS_msn=" in url


class _Stamped:
    """A page's log lines, each with its second since the browsers started (a stall
    or an error then reads against the other pages' lines and the test's steps)."""

    def __init__(self, started: float, lines: list[str]) -> None:
        self.started, self.lines = started, lines

    def append(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self.started:7.2f} {line}")


class Browsers:
    """Opens pages, each in its own Chromium with a fresh profile, and records what
    went wrong on them (:attr:`problems`)."""

    def __init__(self, pw, executable: str, tmp: Path, artifacts: Path) -> None:
        self.pw = pw
        self.executable = executable
        self.tmp = tmp
        self.artifacts = artifacts
        self.contexts: list = []
        self.logs: dict[str, list[str]] = {}
        self.problems: list[str] = []  # "<page> <what>", in the order they happened
        self.closing = False  # closing a browser aborts its requests: not a problem
        self.expected: list[tuple[int, str]] = []  # (status, URL part) a test provokes
        self.provoked: list[tuple[int, str]] = []  # (status, URL) answered as expected
        # per page: the blocking reloads answered 503, by URL (a URL asked again
        # within the answer's max-age=1 may come from the page's own cache)
        self.stalls: dict[str, set[str]] = {}
        self.started = time.monotonic()  # log lines say their second since then
        self.timeouts_before = _blocking_timeouts()

    def expect_http(self, status: int, url_part: str) -> None:
        """One answer ``status`` to a URL containing ``url_part`` is what the test
        provokes (a refused stale save), not a problem; any other still is."""
        self.expected.append((status, url_part))

    def _problem(self, name: str, text: str) -> None:
        if self.closing:
            return
        line = f"{name} {text}"
        _Stamped(self.started, self.logs.setdefault(name, [])).append(f"[problem] {text}")
        self.problems.append(line)

    async def page(self, name: str, *, camera: bool = False, phone: bool = False):
        profile = self.tmp / f"profile-{name}"
        profile.mkdir()
        ctx = await self.pw.chromium.launch_persistent_context(
            str(profile), executable_path=self.executable, headless=True,
            args=BASE_ARGS + (CAMERA_ARGS if camera else []),
            permissions=["camera", "microphone"] if camera else [],
            **(PHONE if phone else DESKTOP),
        )
        self.contexts.append(ctx)
        page = ctx.pages[0] if ctx.pages else await ctx.new_page()
        lines = _Stamped(self.started, self.logs.setdefault(name, []))

        def on_console(m) -> None:
            where = m.location or {}
            lines.append(f"[{m.type}] {m.text} ({where.get('url', '')})")
            url = where.get("url") or ""
            if m.type == "error" and any(
                    f"status of {status}" in m.text and part in url
                    for status, part in self.provoked + self.expected):
                return  # Chromium's own line for the provoked answer
            if m.type == "error" and "status of 503" in m.text and _blocking_reload(url):
                return  # Chromium's own line for a stall (on_response, judged at close)
            if m.type == "error":
                self._problem(name, f"console error: {m.text} at {where.get('url', '?')}")

        def on_response(r) -> None:
            if r.status >= 400:
                hit = next((e for e in self.expected if e[0] == r.status and e[1] in r.url),
                           None)
                if hit is not None:
                    self.expected.remove(hit)
                    self.provoked.append((r.status, r.url))
                    lines.append(f"[expected] HTTP {r.status} {r.request.method} {r.url}")
                    return
                if r.status == 503 and _blocking_reload(r.url):
                    # LL-HLS: the part asked for did not arrive within three target
                    # durations (rfc8216bis 6.2.5.2; streaming/hls.py); hls.js asks
                    # again. Whose stall it was, the server counted: judged at close
                    # (stall_problems).
                    self.stalls.setdefault(name, set()).add(r.url)
                    timing = r.request.timing
                    held = timing.get("responseStart", -1) - timing.get("requestStart", 0)
                    lines.append(f"[stalled] HTTP 503 {r.request.method} {r.url}"
                                 f" (held {held:.0f} ms)")
                    return
                self._problem(name, f"HTTP {r.status} {r.request.method} {r.url}")

        def on_page_error(e) -> None:
            lines.append(f"[pageerror] {e}")
            self._problem(name, f"page error: {e}")

        def on_failed(r) -> None:
            if r.failure == "net::ERR_ABORTED" and "/hls/" in r.url:
                # hls.js cancelling its own request (a blocking playlist reload it
                # replaces with a newer one, a part it no longer needs): normal LL-HLS
                # client behaviour, not a failed load. Logged, not a problem.
                lines.append(f"[cancelled] {r.method} {r.url}")
                return
            self._problem(name, f"request failed: {r.method} {r.url} {r.failure}")

        page.on("console", on_console)
        page.on("pageerror", on_page_error)
        page.on("requestfailed", on_failed)
        page.on("response", on_response)
        return page

    async def shot(self, page, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path

    def stall_problems(self) -> list[str]:
        """The pages' 503 blocking reloads the server did not count as a silent
        publisher's: each is a stall of the server's own."""
        now = _blocking_timeouts()
        delta = {p: now[p] - self.timeouts_before[p] for p in now}
        seen = sum(len(urls) for urls in self.stalls.values())
        out = []
        if delta["sending"] or delta["elsewhere"]:
            out.append(f"server: {delta['sending']:.0f} blocking reload(s) timed out while "
                       f"the publisher sent media, {delta['elsewhere']:.0f} on a worker "
                       f"without it (dropserver_hls_blocking_timeouts_total)")
        if seen > delta["silent"]:
            by_page = {name: len(urls) for name, urls in self.stalls.items()}
            out.append(f"pages: {seen} blocking reload(s) answered 503 ({by_page}), "
                       f"only {delta['silent']:.0f} while the publisher was silent")
        return out

    async def close(self) -> None:
        self.closing = True
        self.problems.extend(self.stall_problems())
        for name, lines in self.logs.items():
            (self.artifacts / f"{name}.console.log").write_text("\n".join(lines) + "\n")
        for ctx in self.contexts:
            await ctx.close()


@pytest.fixture
async def browsers(tmp_path: Path, artifacts: Path) -> AsyncIterator[Browsers]:
    executable = chromium_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = Browsers(pw, executable, tmp_path, artifacts)
        try:
            yield b
        finally:
            await b.close()
        if b.problems:
            pytest.fail("the pages logged errors or failed loads:\n" + "\n".join(b.problems),
                        pytrace=False)


async def api_drop(http, token: str, *, steps: tuple[str, ...] = ("schedule", "live"),
                   title: str = "E2E drop", units: int = 5) -> dict:
    """A drop made through the creator API and taken through ``steps`` (paths under
    /v1/drops/{id}/); the drop resource as created."""
    from datetime import UTC, datetime, timedelta

    auth = {"authorization": f"Bearer {token}"}
    resp = await http.post("/v1/drops", headers=auth, json={
        "title": title, "products": [{"title": "Signed vinyl", "price": 4900, "units": units}],
        "starts_at": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()})
    assert resp.status_code == 201, resp.text
    drop = resp.json()
    for step in steps:
        body = ({"product_id": drop["products"][0]["product_id"]} if step == "buy-now"
                else {})
        r = await http.post(f"/v1/drops/{drop['id']}/{step}", headers=auth, json=body)
        assert r.status_code == 200, (step, r.text)
    return drop
