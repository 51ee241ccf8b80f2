"""Headless Chromium for the end-to-end tests: Debian's ``/usr/bin/chromium`` driven by
Playwright (never ``playwright install``). Each page gets its own browser with a fresh
``--user-data-dir``; the console's browser has a fake camera and microphone.

Screenshots and each page's console log are kept under ``artifacts/e2e/<test>/``
(``DROPSERVER_E2E_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
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


class Browsers:
    """Opens pages, each in its own Chromium with a fresh profile."""

    def __init__(self, pw, executable: str, tmp: Path, artifacts: Path) -> None:
        self.pw = pw
        self.executable = executable
        self.tmp = tmp
        self.artifacts = artifacts
        self.contexts: list = []
        self.logs: dict[str, list[str]] = {}

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
        lines = self.logs.setdefault(name, [])
        page.on("console", lambda m: lines.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: lines.append(f"[pageerror] {e}"))
        page.on("requestfailed", lambda r: lines.append(
            f"[requestfailed] {r.method} {r.url} {r.failure}"))
        return page

    async def shot(self, page, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path

    async def close(self) -> None:
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


def page_errors(browsers: Browsers) -> Callable[[str], list[str]]:
    return lambda name: [ln for ln in browsers.logs.get(name, []) if ln.startswith(
        "[pageerror]")]
