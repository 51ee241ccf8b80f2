"""A rehearsal's verdict: BUY NOW beside the floor, and pass or fail.

:func:`compare_floor` puts BUY NOW's percentiles beside the bare-broadcast floor of the
same run (their ratios). :func:`judge` lists the failures against the targets
(docs/loadtest.md): every viewer joined and saw BUY NOW within the p99 budget, no
event lost or out of order, no oversell, as many holds as the stock allows, and
PostgreSQL's orders (the rehearsal's audit) agreeing with what buyers were told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtest.rehearse import RehearsalConfig

__all__ = ["bucket_ms", "compare_floor", "judge"]


def compare_floor(result: dict[str, Any]) -> None:
    """BUY NOW against the floor of the same run: the ratios of their percentiles."""
    floor = result.get("floor", {})
    if not floor.get("measured"):
        return
    ratio: dict[str, float | None] = {}
    for key in ("p50_ms", "p99_ms", "max_ms"):
        ours, bare = result["buy_now"]["latency"].get(key), floor["latency"].get(key)
        ratio[key.removesuffix("_ms")] = round(ours / bare, 2) if ours and bare else None
    result["buy_now"]["floor_ratio"] = ratio


def bucket_ms(lat: dict[str, Any]) -> float:
    """The histogram's bucket width (ms) for a latency summary: about 60 buckets."""
    top = lat.get("max_ms") or 100.0
    return max(1.0, round(top / 60.0))


def judge(result: dict[str, Any], cfg: RehearsalConfig) -> list[str]:
    """Pass or fail: everyone saw BUY NOW within the p99 budget, nothing lost, no oversell."""
    fail: list[str] = []
    conn = result["connections"]
    if conn["joined"] < cfg.viewers:
        fail.append(f"only {conn['joined']} of {cfg.viewers} viewers joined")
    seen = result["buy_now"]["seen"] + result["buy_now"]["late_via_snapshot"]
    if seen < conn["joined"]:
        fail.append(f"BUY NOW reached {seen} of {conn['joined']} joined viewers")
    p99 = result["buy_now"]["latency"].get("p99_ms")
    if p99 is None or p99 > cfg.p99_budget_ms:
        fail.append(f"BUY NOW p99 {p99} ms over the {cfg.p99_budget_ms:.0f} ms budget")
    pos = result["positions"]
    if pos["lost"] or pos["out_of_order"] or pos["recovery_failed"] or pos["epoch_changes"]:
        fail.append(f"events lost {pos['lost']}, out of order {pos['out_of_order']}, "
                    f"unrecoverable resumes {pos['recovery_failed']}, "
                    f"epoch changes {pos['epoch_changes']}")
    audit = result["audit"]
    if audit.get("oversold"):
        fail.append(f"OVERSOLD by {audit['oversold']}")
    res = result["reservations"]
    expected = min(cfg.stock, res["sent"])
    if res["held"] != expected:
        fail.append(f"{res['held']} holds told to buyers, expected min(stock, buyers) = "
                    f"{expected}")
    if audit.get("checked") and audit.get("active_orders") != res["held"]:
        fail.append(f"PostgreSQL has {audit.get('active_orders')} active orders, buyers were "
                    f"told {res['held']}")
    if audit.get("checked") and audit.get("mismatched_users"):
        fail.append(f"{audit['mismatched_users']} holds differ between PostgreSQL and replies")
    return fail
