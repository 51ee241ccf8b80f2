"""The rehearsal's giveaway scenario (``--giveaway``): every viewer enters at once.

After the drop goes live and before BUY NOW the creator opens a giveaway (a prize in
text, ``--giveaway-winners``, a ``--giveaway-window`` second window). Each viewer that
wants to (``--enter-probability``) sends ``giveaway.enter`` on its socket once, at a
moment spread evenly over the first 80 % of the window (50,000 viewers and a 10 s
window: 50,000 entries in 8 s). The server draws at the window's end.

:func:`run_phase` drives it; :func:`figures` turns the swarms' reports into the
result's ``giveaway`` section (entries per second, answer latency, refusal codes,
what viewers were shown); :func:`audit` recomputes the draw from PostgreSQL alone
(:func:`drops.giveaway_store.audit`: the seed against its commitment, every ticket,
the winners) and compares it with what every viewer was shown and with the entries
the server acknowledged; :func:`judge` lists the failures.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from loadtest.stats import summarize

__all__ = ["audit", "figures", "judge", "run_phase"]

PRIZE = "Rehearsal prize"


async def run_phase(rehearsal: Any, creator: Any) -> dict[str, Any]:
    """Open the giveaway, wait out its window, every answer and the draw."""
    cfg = rehearsal.cfg
    rehearsal.phase("giveaway")
    p = rehearsal.progress
    opened = await creator.open_giveaway(prize=PRIZE, winners=cfg.giveaway_winners,
                                         duration_s=int(cfg.giveaway_window_s))
    t_open = creator.calls["giveaway"]
    await rehearsal.wait_for("the giveaway window", lambda: False,
                             limit_s=cfg.giveaway_window_s, note=False)
    await rehearsal.wait_for(
        "every giveaway entry to be answered",
        lambda: p.total("entries_answered") >= p.total("entries_sent"), limit_s=30)
    await rehearsal.wait_for(
        "the giveaway's draw to reach every open viewer",
        lambda: p.total("giveaway_drawn_seen") >= p.total("joined"), limit_s=30)
    return {"id": opened["id"], "opened_at": t_open, "commitment": opened["commitment"],
            "window_s": cfg.giveaway_window_s, "winners": cfg.giveaway_winners}


def figures(reports: list[dict[str, Any]], phase: dict[str, Any]) -> dict[str, Any]:
    """The swarms' entries and results, merged."""
    parts = [r.get("giveaway") or {} for r in reports]
    entrants = [u for g in parts for u in g.get("entrants", ())]
    codes: Counter[str] = Counter()
    shown: Counter[str] = Counter()
    for g in parts:
        codes.update(g.get("entry_codes", {}))
        shown.update(g.get("drawn_seen", {}))
    answered = sorted(t for g in parts for t in g.get("answered_at", ()))
    totals: Counter[str] = Counter()
    for r in reports:
        totals.update({k: v for k, v in r["totals"].items() if k.startswith("entries_")})
    span = answered[-1] - answered[0] if len(answered) > 1 else 0.0
    return {
        "id": phase["id"], "commitment": phase["commitment"],
        "window_s": phase["window_s"], "winners_asked": phase["winners"],
        "entries_sent": totals["entries_sent"], "answered": len(answered),
        "new": totals["entries_new"], "repeat": totals["entries_repeat"],
        "refused": dict(codes),
        "entrants_acknowledged": len(set(entrants)),
        # answers over the time from the first answer to the last
        "answers_per_s": round(len(answered) / span, 1) if span > 0 else None,
        "answered_within_s": round(span, 2),
        "latency": summarize([x for g in parts for x in g.get("entry_s", ())]),
        "shown": dict(shown),  # "giveaway:seed:tickets" -> viewers shown that result
        "_entrants": sorted(set(entrants)),
    }


async def audit(database_url: str, result: dict[str, Any]) -> dict[str, Any]:
    """The draw recomputed from PostgreSQL, against what viewers were shown and the
    entries the server acknowledged."""
    if not database_url:
        return {"checked": False, "why": "no database URL for a remote target"}
    import asyncpg

    from drops import giveaway_store

    gid = result["id"]
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            row = await conn.fetchrow(
                "SELECT state, seed, commitment, entrants FROM giveaways WHERE id = $1", gid)
            if (row is not None and row["state"] == "drawn") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        recomputed = await giveaway_store.audit(conn, gid)
        users = {r["user_id"] for r in await conn.fetch(
            "SELECT user_id FROM giveaway_entrants WHERE giveaway_id = $1", gid)}
    finally:
        await conn.close()
    acknowledged = set(result.pop("_entrants", ()))
    expected_shown = (f"{gid}:{row['seed']}:{','.join(recomputed.winners)}"
                      if row is not None else None)
    shown = result.get("shown", {})
    return {
        "checked": True, "state": row["state"] if row else None,
        "recomputed_ok": recomputed.ok, "problems": recomputed.problems[:10],
        "winners": recomputed.winners,
        "shown_as_recomputed": sum(n for k, n in shown.items() if k == expected_shown),
        "shown_otherwise": sum(n for k, n in shown.items() if k != expected_shown),
        "entrants_in_postgresql": len(users),
        "entrants_announced": row["entrants"] if row else None,
        "acknowledged_not_recorded": len(acknowledged - users),
        "recorded_not_acknowledged": len(users - acknowledged),
    }


def judge(result: dict[str, Any]) -> list[str]:
    """Failures of the giveaway scenario: a draw not reproducible from PostgreSQL,
    viewers shown another result, entries lost or invented, entries refused."""
    g = result.get("giveaway")
    if not g:
        return []
    fail: list[str] = []
    a = g.get("audit", {})
    if not a.get("checked"):
        return fail
    if a.get("state") != "drawn":
        fail.append(f"the giveaway was not drawn (state {a.get('state')})")
        return fail
    if not a.get("recomputed_ok"):
        fail.append(f"the draw does not follow from PostgreSQL: {a.get('problems')}")
    if a.get("shown_otherwise"):
        fail.append(f"{a['shown_otherwise']} viewers were shown another giveaway result")
    joined = result.get("connections", {}).get("open_at_end", 0)
    if a.get("shown_as_recomputed", 0) < joined:
        fail.append(f"the giveaway result reached {a.get('shown_as_recomputed')} of "
                    f"{joined} open viewers")
    if a.get("acknowledged_not_recorded") or a.get("recorded_not_acknowledged"):
        fail.append(f"entrants: {a.get('acknowledged_not_recorded')} acknowledged but not "
                    f"in PostgreSQL, {a.get('recorded_not_acknowledged')} in PostgreSQL "
                    "but never acknowledged")
    if a.get("entrants_announced") != a.get("entrants_in_postgresql"):
        fail.append(f"{a.get('entrants_announced')} entrants announced, "
                    f"{a.get('entrants_in_postgresql')} in PostgreSQL")
    if g.get("refused"):
        fail.append(f"giveaway entries refused: {g['refused']}")
    if g.get("answered", 0) < g.get("entries_sent", 0):
        fail.append(f"{g['entries_sent'] - g['answered']} giveaway entries got no answer")
    return fail
