"""loadtest/report.py and the figures the rehearsal composes for it (no sockets)."""

from __future__ import annotations

from pathlib import Path

from loadtest.rehearse import Rehearsal, RehearsalConfig
from loadtest.report import format_console, write_reports
from loadtest.viewer_summary import summarize_viewers


def _report(ramp_started_at: float, joined_at: list[float]) -> dict:
    report = summarize_viewers([])
    report.update({"joined_at": joined_at, "ramp_started_at": ramp_started_at,
                   "connect_errors": {}, "close_reasons": {}})
    report["totals"] = {"joined": len(joined_at)}
    return report


def _compose(cfg: RehearsalConfig, reports: list[dict]) -> dict:
    return Rehearsal(cfg).compose(reports, {"checked": False}, t_buy_now=0.0,
                                  joined=sum(len(r["joined_at"]) for r in reports),
                                  connect_s=12.0, baseline=None, after_connect=None,
                                  cpu_window=(None, None))


def test_connect_rate_counts_from_the_first_socket_not_the_first_join() -> None:
    """2,000 sockets asked at 200/s from t=100: the first joins only at t=103 (the server
    was slow to answer), the last at t=110. That is 200 joins/s, not 2000 / 7 = 286."""
    cfg = RehearsalConfig(viewers=2000, connect_rate=200.0)
    joins = [103 + 7 * i / 999 for i in range(1000)]
    result = _compose(cfg, [_report(100.0, joins), _report(100.02, joins)])
    conn = result["connections"]
    assert conn["rate_per_s"] == 200.0
    assert conn["first_socket_to_last_join_s"] == 10.0
    assert conn["asked_rate_per_s"] == 200
    line = next(row for row in format_console(result).splitlines() if "connect rate" in row)
    assert "200.0 /s" in line and "asked 200 /s" in line


def test_headings_say_the_verdict_once_and_count_in_the_right_number(tmp_path: Path) -> None:
    cfg = RehearsalConfig(viewers=1, stock=1, server_workers=1, swarm_processes=1)
    result = _compose(cfg, [_report(100.0, [100.5])])
    paths = write_reports(result, tmp_path, "r")
    page = Path(paths["html"]).read_text()
    heading = page.split("<h1>", 1)[1].split("</h1>", 1)[0]
    verdict = "PASS" if result["passed"] else "FAIL"
    assert heading.count(verdict) == 1, heading
    assert "1 viewer," in heading and "1 server worker," in heading
    assert "1 swarm process," in heading
    console = format_console(result)
    assert "1 server worker," in console and "workers" not in console.splitlines()[1]
    many = _compose(RehearsalConfig(viewers=3000, server_workers=2, swarm_processes=3),
                    [_report(100.0, [100.5])])
    assert "3,000 viewers, stock 100, 2 server workers, 3 swarm processes," in \
        format_console(many)
