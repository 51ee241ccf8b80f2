"""The docs name only things that exist: every metric, setting and server frame type
a page mentions is one the code has (a page that said `reconnect` for the
`going_away` frame, or a metric by an old name, is caught here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "docs" / "topics").glob("*.md"))]
# Environment variables that are not settings (dropserver/settings.py) but are read
# elsewhere: the local services' binaries, the tests' servers, the supervisor's.
NOT_SETTINGS = {"DROPSERVER_REDIS_SERVER", "DROPSERVER_POSTGRES_BIN", "TEST_REDIS_URL",
                "TEST_DATABASE_URL", "DROPSERVER_SUPERVISOR_PID",
                "DROPSERVER_WORKER_INDEX"}  # set by the supervisor for each worker


def _mentioned(pattern: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for name in set(re.findall(pattern, page.read_text())):
            found.setdefault(name, []).append(page.relative_to(ROOT).as_posix())
    return found


def test_every_metric_the_docs_name_exists():
    import prometheus_client

    import dropserver.app  # noqa: F401  (every package registers its metrics)

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    missing = {m: pages for m, pages in _mentioned(r"\bdropserver_[a-z_]+[a-z]\b").items()
               if m not in names and m.removesuffix("_total") not in names}
    assert missing == {}


def test_every_setting_the_docs_name_exists():
    from dropserver.settings import describe

    settings = {var for var, _default, _text in describe()}
    missing = {v: pages for v, pages in _mentioned(r"\bDROPSERVER_[A-Z_]+[A-Z]\b").items()
               if v not in settings and v not in NOT_SETTINGS}
    assert missing == {}


def test_every_server_frame_type_the_pages_name_exists():
    """Frame types written as ``{"t": "..."}`` or as a `...` frame (a dotted name
    there is an event carried by a frame, e.g. the private `order.held`)."""
    from realtime.protocol import ClientType, ServerType

    known = {t.value for t in ServerType} | {t.value for t in ClientType}
    named = _mentioned(r'"t":\s*"([a-z_.]+)"')
    for name, pages in _mentioned(r"`([a-z_]+)` frames?\b").items():
        named.setdefault(name, []).extend(pages)
    # registered in app.state.commands: by checkout (buy, cancel_hold, bid), and by drops
    # (giveaways)
    commands = {"buy", "cancel_hold", "bid", "giveaway.enter"}
    missing = {t: pages for t, pages in named.items() if t not in known | commands}
    assert missing == {}
