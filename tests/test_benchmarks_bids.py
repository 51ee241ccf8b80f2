"""The bids benchmark's war (benchmarks/bids.py) against the real app: every bidder
bids back to back, every answer is counted and checked."""

from __future__ import annotations

import httpx

from benchmarks._buyers import open_buyers
from benchmarks.bids import running_auction, war
from dropserver.auth import Role
from tests.conftest import running


async def test_a_short_war_answers_every_bid_and_the_leading_bid_is_the_top(settings,
                                                                           make_token):
    # The bid limits off, as the benchmark runs (every bidder on loopback, back to back).
    async with running(settings, buy_rate_per_user=0, buy_rate_per_ip=0) as srv:
        drop_id, auction_id = await running_auction(
            srv.base_url, make_token("bids-creator", Role.CREATOR))
        bidders = await open_buyers(f"{srv.ws_url}/ws", drop_id,
                                    [make_token(f"bidder-{i}", Role.VIEWER) for i in range(6)])
        try:
            result = await war(bidders, auction_id, 1.0)
        finally:
            for b in bidders:
                b.close()
        assert result["lost"] == {}, result
        # Six bidders racing for the same amounts: some win, most are refused.
        assert result["accepted"] >= 2 and result["refused"].get("bid_too_low", 0) >= 1
        assert result["answers"] == result["accepted"] + sum(result["refused"].values())
        assert set(result["refused"]) <= {"bid_too_low", "already_leading"}, result
        assert result["seqs_1_to_n"] and result["amounts_rise"], result
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            shown = (await http.get(f"/v1/drops/{drop_id}/auctions/{auction_id}")).json()
        assert shown["leading"]["amount"] == result["top"]
        assert shown["bids"] == result["accepted"]
