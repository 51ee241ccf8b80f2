"""drops/settlement.py: the pure arithmetic, with hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drops.settlement import Sale, Split, allocate, exact_share, fee, settle


def test_seed_000_waterfall() -> None:
    # Customer pays 100.00, platform fee 10% = 10.00, COGS 40.00, profit 50.00 split
    # 12.50 / 12.50 / 25.00. Stripe's 3.20 comes out of the platform fee: 6.80 net.
    s = settle([Sale(order_id=1, amount=10000, payment_fee=320, cogs=4000)], Split(),
               {"inv-a": 1})
    assert (s.gross, s.platform_fee, s.net_platform_fee, s.cogs, s.profit) == \
        (10000, 1000, 680, 4000, 5000)
    assert (s.profit_platform, s.profit_creator, s.profit_investors) == (1250, 1250, 2500)
    assert s.investors == {"inv-a": 2500}
    assert s.creator_payout == 5250 and s.platform_total == 1930


def test_largest_remainder_examples() -> None:
    assert allocate(100, [1, 1, 1]) == [34, 33, 33]
    assert allocate(1, [1, 1]) == [1, 0]
    assert allocate(10, [0, 5]) == [0, 10]
    assert allocate(7, [2500, 2500, 5000]) == [2, 2, 3]  # 1.75 1.75 3.5 -> .75s win
    with pytest.raises(ValueError):
        allocate(5, [0, 0])
    with pytest.raises(ValueError):
        allocate(-1, [1])


def test_refunds_reduce_revenue_and_cogs() -> None:
    sales = [Sale(1, 5000, refunded=5000, payment_fee=175, cogs=1000),
             Sale(2, 5000, payment_fee=175, cogs=1000)]
    s = settle(sales, Split())
    assert (s.gross, s.refunds, s.net_revenue, s.cogs) == (10000, 5000, 5000, 1000)
    assert s.platform_fee == 500 and s.profit == 3500
    # no stakes: the investors' half goes to the creator
    assert (s.profit_platform, s.profit_creator, s.profit_investors) == (875, 2625, 0)


def test_loss_distributes_nothing() -> None:
    s = settle([Sale(1, 1000, cogs=5000)], Split())
    assert s.profit == 0 and s.shortfall == 4100
    assert s.profit_platform == s.profit_creator == s.profit_investors == 0


def test_split_must_sum_to_whole() -> None:
    with pytest.raises(ValueError):
        Split(platform_bps=3000, creator_bps=3000, investors_bps=3000)
    assert fee(999, 1000) == 100 and fee(994, 1000) == 99


@settings(max_examples=400, deadline=None)
@given(total=st.integers(0, 10**12),
       weights=st.lists(st.integers(0, 10**9), min_size=1, max_size=40)
       .filter(lambda w: sum(w) > 0))
def test_allocate_is_exact_nonnegative_and_within_a_cent(total, weights) -> None:
    parts = allocate(total, weights)
    assert sum(parts) == total
    assert all(p >= 0 for p in parts)
    wsum = sum(weights)
    for p, w in zip(parts, weights, strict=True):
        assert abs(p - exact_share(total, w, wsum)) < 1
        if w == 0:
            assert p == 0


bps3 = st.integers(0, 10000).flatmap(
    lambda a: st.integers(0, 10000 - a).map(lambda b: (a, b, 10000 - a - b)))


@settings(max_examples=300, deadline=None)
@given(sales=st.lists(st.builds(
           lambda amt, ref, fee_, cogs, i: Sale(i, amt, min(ref, amt), fee_, cogs),
           st.integers(1, 10**7), st.integers(0, 10**7), st.integers(0, 10**5),
           st.integers(0, 10**7), st.integers(1, 10**6)), max_size=30),
       split=bps3, fee_bps=st.integers(0, 10000),
       stakes=st.dictionaries(st.text("abcdef", min_size=1, max_size=4),
                              st.integers(0, 10**8), max_size=8))
def test_settlement_sums_exactly(sales, split, fee_bps, stakes) -> None:
    sp = Split(fee_bps, *split)
    s = settle(sales, sp, stakes)
    assert s.net_revenue == s.gross - s.refunds
    # every cent of revenue is accounted for
    assert s.platform_fee + s.cogs + s.profit - s.shortfall == s.net_revenue
    assert s.profit_platform + s.profit_creator + s.profit_investors == s.profit
    assert sum(s.investors.values()) == s.profit_investors
    assert all(v >= 0 for v in s.investors.values())
    assert min(s.profit_platform, s.profit_creator, s.profit_investors, s.profit,
               s.shortfall) >= 0
    # pro rata within a cent
    live = {k: v for k, v in stakes.items() if v > 0}
    total_stake = sum(live.values())
    for name, share in s.investors.items():
        assert abs(share - exact_share(s.profit_investors, live[name], total_stake)) < 1
