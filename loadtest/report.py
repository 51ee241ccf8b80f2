"""Writing a rehearsal's result: JSON, a PNG of the two charts, and an HTML page.

The JSON is the record (every figure the console shows, plus the timeline and the
latency histogram). The PNG holds the BUY NOW latency histogram and connected viewers
over time; the HTML page embeds the PNG (base64) and the figures, so it is one
self-contained file to attach to a ticket. Everything goes under ``loadtest-reports/``
(git-ignored) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["format_console", "write_reports"]


def _plot(result: dict[str, Any], path: Path) -> bool:
    """Draw the PNG; False when matplotlib is not installed (the loadtest extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    hist = result.get("buy_now", {}).get("histogram_ms", [])
    bucket = result.get("buy_now", {}).get("histogram_bucket_ms", 10)
    if hist:
        starts = [b for b, _ in hist]
        counts = [c for _, c in hist]
        ax1.bar(starts, counts, width=bucket, align="edge", color="#3b6ea8")
    lat = result.get("buy_now", {}).get("latency", {})
    for key, colour in (("p50_ms", "#2a9d8f"), ("p99_ms", "#e76f51")):
        if lat.get(key) is not None:
            ax1.axvline(lat[key], color=colour, linestyle="--", label=f"{key[:-3]} {lat[key]} ms")
    ax1.set_title("BUY NOW fan-out latency (creator call -> viewer receipt)")
    ax1.set_xlabel("ms")
    ax1.set_ylabel("viewers")
    if lat.get("count"):
        ax1.legend()
    timeline = result.get("timeline", [])
    if timeline:
        ts = [row["t"] for row in timeline]
        ax2.plot(ts, [row["joined"] for row in timeline], label="joined", color="#3b6ea8")
        ax2.plot(ts, [row["buy_now"] for row in timeline], label="saw BUY NOW",
                 color="#e76f51")
        if any(row.get("cpu_percent") is not None for row in timeline):
            ax3 = ax2.twinx()
            ax3.plot(ts, [row.get("cpu_percent") or 0 for row in timeline],
                     color="#999999", linewidth=0.8, label="server CPU %")
            ax3.set_ylabel("server CPU % (100 = one core)")
        for mark in result.get("phases", []):
            ax2.axvline(mark["t"], color="#cccccc", linewidth=0.8)
            ax2.text(mark["t"], 0, mark["name"], rotation=90, fontsize=7, va="bottom")
    ax2.set_title("viewers over time")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("viewers")
    if timeline:
        ax2.legend(loc="upper left")
    fig.suptitle(_headline(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _verdict(result: dict[str, Any]) -> str:
    return "PASS" if result.get("passed") else "FAIL"


def _count(n: Any, one: str, many: str) -> str:
    if not isinstance(n, int):
        return f"{n} {many}"
    return f"{n:,} {one if n == 1 else many}"


def _setup(result: dict[str, Any]) -> str:
    """What ran: viewers, stock, processes, when."""
    cfg = result.get("config", {})
    workers = cfg.get("server_workers")
    return ", ".join([
        _count(cfg.get("viewers"), "viewer", "viewers"), f"stock {cfg.get('stock')}",
        _count(workers, "server worker", "server workers") if workers is not None
        else "remote server",
        _count(cfg.get("swarm_processes"), "swarm process", "swarm processes"),
        str(result.get("started_at", ""))])


def _headline(result: dict[str, Any]) -> str:
    return f"{_verdict(result)}: {_setup(result)}"


def _rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    conn = result.get("connections", {})
    lat = result.get("buy_now", {}).get("latency", {})
    pos = result.get("positions", {})
    res = result.get("reservations", {})
    audit = result.get("audit", {})
    server = result.get("server", {})
    gen = result.get("generator") or {}
    rlat = res.get("latency", {})

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    return [
        ("viewers joined", f"{fmt(conn.get('joined'))} / {fmt(conn.get('target'))}"),
        ("connect rate", f"{fmt(conn.get('rate_per_s'))} /s (asked "
                         f"{fmt(conn.get('asked_rate_per_s'))} /s; first socket -> last "
                         f"join {fmt(conn.get('first_socket_to_last_join_s'))} s)"),
        ("connect failures", fmt(conn.get("failed"))),
        ("BUY NOW seen", f"{fmt(result.get('buy_now', {}).get('seen'))} / "
                         f"{fmt(conn.get('joined'))}"),
        ("BUY NOW latency p50 / p95 / p99 / max",
         " / ".join(fmt(lat.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")) + " ms"),
        *_storm_rows(result, fmt),
        ("events lost (position gaps + missing tail)", fmt(pos.get("lost"))),
        ("events out of order", fmt(pos.get("out_of_order"))),
        ("buy attempts / holds / sold out / rejected",
         f"{fmt(res.get('sent'))} / {fmt(res.get('held'))} / {fmt(res.get('sold_out'))} / "
         f"{fmt(res.get('rejected'))}"),
        ("reservation latency p50 / p99",
         f"{fmt(rlat.get('p50_ms'))} / {fmt(rlat.get('p99_ms'))} ms"),
        ("stock / active orders in PostgreSQL / oversold",
         f"{fmt(audit.get('units'))} / {fmt(audit.get('active_orders'))} / "
         f"{fmt(audit.get('oversold'))}"),
        *_giveaway_rows(result, fmt),
        ("server RSS per connection", f"{fmt(server.get('rss_per_connection_kib'))} KiB"),
        ("server CPU (avg / peak, 100 = one core)",
         f"{fmt(server.get('cpu_avg_percent'))} / {fmt(server.get('cpu_peak_percent'))} %"),
        ("load generator CPU, countdown to rush / bare floor / rush floor (100 = one core)",
         f"{fmt(gen.get('drop', {}).get('cpu_percent'))} / "
         f"{fmt(gen.get('floor', {}).get('cpu_percent'))} / "
         f"{fmt(gen.get('rush_floor', {}).get('cpu_percent'))} %"),
    ]


def _giveaway_rows(result: dict[str, Any], fmt: Any) -> list[tuple[str, str]]:
    """The giveaway scenario (``--giveaway``), when it ran."""
    g = result.get("giveaway")
    if not g:
        return []
    a = g.get("audit", {})
    lat = g.get("latency", {})
    return [
        ("giveaway entries sent / new / repeat / refused",
         f"{fmt(g.get('entries_sent'))} / {fmt(g.get('new'))} / {fmt(g.get('repeat'))} / "
         f"{fmt(sum((g.get('refused') or {}).values()))}"),
        ("giveaway entries answered per second",
         f"{fmt(g.get('answers_per_s'))} /s ({fmt(g.get('answered'))} in "
         f"{fmt(g.get('answered_within_s'))} s)"),
        ("giveaway entry latency p50 / p99",
         f"{fmt(lat.get('p50_ms'))} / {fmt(lat.get('p99_ms'))} ms"),
        ("giveaway draw from PostgreSQL / shown as recomputed / otherwise",
         f"{'reproduced' if a.get('recomputed_ok') else 'NOT reproduced'} / "
         f"{fmt(a.get('shown_as_recomputed'))} / {fmt(a.get('shown_otherwise'))}"),
        ("giveaway entrants acknowledged / in PostgreSQL",
         f"{fmt(g.get('entrants_acknowledged'))} / {fmt(a.get('entrants_in_postgresql'))}"),
    ]


def _storm_rows(result: dict[str, Any], fmt: Any) -> list[tuple[str, str]]:
    """The floor of the same run, the creator's requests and the chat storm."""
    rows = []
    for name, key, what in (("floor", "floor_ratio", "bare floor: broadcast only"),
                            ("rush_floor", "rush_floor_ratio",
                             "rush floor: broadcast + the same buy rush")):
        floor = result.get(name) or {}
        if not floor.get("measured"):
            continue
        flat = floor.get("latency", {})
        ratio = result.get("buy_now", {}).get(key, {})
        rows += [
            (f"{what}, p50 / p99 / max",
             " / ".join(fmt(flat.get(k)) for k in ("p50_ms", "p99_ms", "max_ms"))
             + f" ms ({fmt(floor.get('delivered'))} / {fmt(floor.get('expected'))} "
             f"delivered, {fmt(floor.get('processes'))} processes)"),
            (f"BUY NOW / {what.split(':')[0]}, p50 / p99"
             + (" (issue 16's goal)" if name == "floor" else ""),
             f"{fmt(ratio.get('p50'))} / {fmt(ratio.get('p99'))}"),
        ]
        rush = floor.get("rush")
        if rush:
            buys, blat = rush.get("buys", {}), rush.get("buy_latency", {})
            rows += [
                ("rush floor: buys sent / held / sold out / no reply",
                 " / ".join(fmt(buys.get(k, 0)) for k in ("sent", "held", "sold_out",
                                                          "no_reply"))
                 + f"; reply p50 / p99 {fmt(blat.get('p50_ms'))} / "
                   f"{fmt(blat.get('p99_ms'))} ms"),
                ("rush floor: units sold per message / stock",
                 f"{', '.join(fmt(e.get('sold')) for e in rush.get('sold', []))} / "
                 f"{fmt(rush.get('stock_per_event'))} (oversold {fmt(rush.get('oversold'))})"),
            ]
    creator = result.get("creator") or {}
    if creator:
        probes = creator.get("probes") or {}
        rows += [
            ("creator's BUY NOW request", f"{fmt(creator.get('buy_now_ms'))} ms"),
            ("creator control path (probe drop) p50 / p99 / max",
             " / ".join(fmt(probes.get(k)) for k in ("p50_ms", "p99_ms", "max_ms"))
             + f" ms ({fmt(probes.get('count'))} requests)"),
        ]
    chat = result.get("chat") or {}
    if chat.get("sent"):
        clat = chat.get("latency", {})
        rows += [
            ("chat sent / asked", f"{fmt(chat.get('sent_per_s'))} / "
                                  f"{fmt(chat.get('rate_asked_per_s'))} per s"),
            ("chat per viewer: received / left out",
             f"{fmt(chat.get('received_per_viewer'))} / {fmt(chat.get('left_out_per_viewer'))}"),
            ("chat delivery p50 / p99", f"{fmt(clat.get('p50_ms'))} / "
                                        f"{fmt(clat.get('p99_ms'))} ms"),
        ]
        rows += _chat_phase_rows(chat, fmt)
    rows += _chat_floor_rows(result, fmt)
    return rows


def _chat_floor_rows(result: dict[str, Any], fmt: Any) -> list[tuple[str, str]]:
    """The chat floor of the same run, per batch interval, and chat's ratio to its best
    (loadtest.verdict.compare_chat_floor)."""
    floor = result.get("chat_floor") or {}
    if not floor.get("measured"):
        return []
    rows = []
    for i in floor.get("intervals", ()):
        lat, per = i.get("latency", {}), i.get("per_viewer", {})
        label = f"batch {i['batch_ms']} ms" if i["batch_ms"] else "unbatched"
        rows.append((f"chat floor, {label}: p50 / p99 / max",
                     " / ".join(fmt(lat.get(k)) for k in ("p50_ms", "p99_ms", "max_ms"))
                     + f" ms ({fmt(i.get('delivered'))} / {fmt(i.get('expected'))} delivered"
                     f", {fmt(i.get('sent_per_s'))} sent per s, per viewer "
                     f"{fmt(per.get('min'))}-{fmt(per.get('max'))})"))
    best = floor.get("best")
    ratio = (result.get("chat") or {}).get("chat_floor_ratio") or {}
    if best:
        rows.append((f"chat / chat floor (best: {best['batch_ms']} ms), p50 / p99 / before "
                     "BUY NOW p99",
                     " / ".join(fmt(ratio.get(k)) for k in ("p50", "p99", "before_p99"))))
    return rows


_PHASE_NAMES = {"before": "posted before BUY NOW", "rush": "posted in the rush",
                "after": "posted after the rush"}


def _chat_phase_rows(chat: dict[str, Any], fmt: Any) -> list[tuple[str, str]]:
    """Chat delivery by when each message was posted, each split into send to the
    server's acceptance and acceptance to delivery (loadtest.figures.chat_by_phase)."""
    phases = chat.get("phases") or {}
    rows = []
    for name in ("before", "rush", "after"):
        part = phases.get(name)
        if not part:
            continue
        lat, to_server, after = (part.get(k) or {} for k in (
            "latency", "to_server_latency", "after_post_latency"))
        label = _PHASE_NAMES[name] + (f" (BUY NOW + {fmt(phases.get('rush_s'))} s)"
                                      if name == "rush" else "")
        rows.append((f"chat {label}: p50 / p99",
                     f"{fmt(lat.get('p50_ms'))} / {fmt(lat.get('p99_ms'))} ms "
                     f"({fmt(lat.get('count'))} timed); to server p50 / p99 "
                     f"{fmt(to_server.get('p50_ms'))} / {fmt(to_server.get('p99_ms'))}, "
                     f"then to viewer {fmt(after.get('p50_ms'))} / "
                     f"{fmt(after.get('p99_ms'))} ms"))
    return rows


def format_console(result: dict[str, Any]) -> str:
    """The summary printed at the end of a run."""
    rows = _rows(result)
    width = max(len(k) for k, _ in rows)
    lines = ["", _headline(result), ""]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    failures = result.get("failures", [])
    if failures:
        lines += ["", "  failed checks:"] + [f"    - {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _html(result: dict[str, Any], png: Path | None) -> str:
    img = ""
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        img = f'<img alt="charts" src="data:image/png;base64,{data}" style="max-width:100%">'
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                     for k, v in _rows(result))
    failures = "".join(f"<li>{html.escape(f)}</li>" for f in result.get("failures", []))
    verdict = _verdict(result)
    colour = "#2a9d8f" if result.get("passed") else "#e76f51"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dropserver rehearsal {verdict}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1400px}}
th{{text-align:left;padding:2px 1em 2px 0;font-weight:normal;color:#555}}
td{{font-variant-numeric:tabular-nums}}h1 span{{color:{colour}}}</style></head>
<body><h1><span>{verdict}</span> {html.escape(_setup(result))}</h1>
<table>{rows}</table>
{"<h2>Failed checks</h2><ul>" + failures + "</ul>" if failures else ""}
{img}
<h2>Command</h2><pre>{html.escape(result.get("command", ""))}</pre>
<h2>Raw result</h2><pre>{html.escape(json.dumps(result, indent=2)[:200000])}</pre>
</body></html>
"""


def write_reports(result: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.png`` (when matplotlib is there), ``<stem>.html``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    png = out_dir / f"{stem}.png"
    if _plot(result, png):
        paths["png"] = str(png)
    html_path = out_dir / f"{stem}.html"
    json_path = out_dir / f"{stem}.json"
    paths["html"] = str(html_path)
    paths["json"] = str(json_path)
    result = {**result, "reports": paths}
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    html_path.write_text(_html(result, png if "png" in paths else None))
    return paths
