"""Build hook: the web pages' JavaScript dependencies come from npm.

``pip install`` (editable or not) runs ``npm ci && npm run build`` in ``web/`` when
``web/dist/`` is missing or older than the lock file, so the two Quick start commands
give pages with their player. Without npm the install still succeeds and says so: the
pages then fall back to the browser's native HLS (docs/web.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PUBLIC = ("index.html", "console.html", "css", "js", "img", "dist")


class WebBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        web = Path(self.root) / "web"
        if not (web / "package.json").is_file():
            return
        self._build(web)
        if version != "editable":  # an editable install serves the repository's web/
            for name in PUBLIC:
                if (web / name).exists():
                    build_data["force_include"][str(web / name)] = f"dropserver/web/{name}"

    @staticmethod
    def _build(web: Path) -> None:
        marker = web / "dist" / "hls.mjs"
        lock = web / "package-lock.json"
        if marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime:
            return
        npm = shutil.which("npm")
        if npm is None:
            print("dropserver: npm not found; the web pages will use native HLS only "
                  "(install Node.js and run `npm ci && npm run build` in web/)",
                  file=sys.stderr)
            return
        for cmd in ([npm, "ci", "--no-audit", "--no-fund", "--silent"],
                    [npm, "run", "--silent", "build"]):
            subprocess.run(cmd, cwd=web, check=True)
