"""benchmarks/reserve_script.py: Redis' time per reserve.lua call, per kind of buy."""

from __future__ import annotations

import argparse

from benchmarks.reserve_script import _run
from checkout.scripts import source


async def test_every_kind_is_measured_and_every_call_takes_a_unit(clean_backends,
                                                                  tmp_path) -> None:
    base = tmp_path / "reserve.lua"
    base.write_bytes(source("reserve"))
    ns = argparse.Namespace(rounds=2, calls=50, pipeline=20, base_script=str(base))
    out = await _run(clean_backends.redis_url, ns)
    for kind in ("no_variants", "variant", "base_no_variants"):
        assert len(out[kind]["usec_per_call"]) == 2 and out[kind]["median_usec"] > 0
    assert out["variant_over_no_variants"] > 0 and out["no_variants_over_base"] > 0
