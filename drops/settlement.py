"""Settlement arithmetic: pure, integer minor units, exact to the cent.

The revenue waterfall of seed 000 ("Revenue Distribution Flow"): a buyer pays 100;
the platform fee is 10% (10.00) and the payment fees (Stripe's 3.2% there) are paid
out of it (net platform fee 6.80); the remaining 90 less COGS (40) is the
distributable profit (50), split platform 25% / creator 25% / investors 50%, the
investors' part pro rata to their stakes. All splits are configurable per drop
(``drops.platform_fee_bps``, ``split_*_bps``).

Every split uses the largest remainder (Hamilton) method: each party gets the floor
of its exact quota, and the cents left over go one each to the largest fractional
remainders (ties to the earlier party), so the parts always sum to the whole and each
part is within one cent of its exact share.

Decisions where the seed is silent:

* refunded money is not revenue: gross is what was captured, ``refunds`` is
  subtracted before the platform fee is taken;
* COGS counts the units of orders that stay paid (a fully refunded order returns its
  unit to stock, so it has no cost);
* the creator is reimbursed the COGS (they bought the goods): their payout is COGS
  plus their profit share;
* a loss (COGS above what is left) distributes nothing; the shortfall is reported;
* with no investor stakes recorded, the investors' share goes to the creator.

Tips (a viewer's gift to the creator during the live) take the same platform fee
rule and nothing else: the platform fee (``platform_fee_bps``) of the tips net of
refunds, out of which the platform pays the tips' payment fees; the rest of the tips
goes to the creator. Tips carry no COGS and are not distributable profit: investors
and the profit split do not share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["BPS", "Sale", "Settlement", "Split", "allocate", "fee", "settle"]

BPS = 10_000


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` (>= 0) in proportion to ``weights`` (>= 0, not all zero) by
    largest remainder. Returns non-negative ints that sum to ``total``."""
    if total < 0:
        raise ValueError("total must not be negative")
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    wsum = sum(weights)
    if wsum == 0:
        raise ValueError("at least one weight must be positive")
    floors = [total * w // wsum for w in weights]
    # remainder numerators: (total * w) mod wsum, compared exactly as integers
    rems = [(total * w) % wsum for w in weights]
    left = total - sum(floors)
    order = sorted(range(len(weights)), key=lambda i: (-rems[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def fee(amount: int, bps: int) -> int:
    """``amount * bps / 10000`` rounded half up (a fee on a positive amount)."""
    if not 0 <= bps <= BPS:
        raise ValueError("bps must be within 0..10000")
    return (amount * bps + BPS // 2) // BPS


@dataclass(frozen=True, slots=True)
class Sale:
    """One paid order: what was captured, refunded, the gateway fee and its COGS."""

    order_id: int
    amount: int             # captured
    refunded: int = 0
    payment_fee: int = 0
    cogs: int = 0           # unit cost * quantity


@dataclass(frozen=True, slots=True)
class Split:
    platform_fee_bps: int = 1000
    platform_bps: int = 2500
    creator_bps: int = 2500
    investors_bps: int = 5000

    def __post_init__(self) -> None:
        for v in (self.platform_fee_bps, self.platform_bps, self.creator_bps,
                  self.investors_bps):
            if not 0 <= v <= BPS:
                raise ValueError("basis points must be within 0..10000")
        if self.platform_bps + self.creator_bps + self.investors_bps != BPS:
            raise ValueError("the profit split must sum to 10000 basis points")


@dataclass(frozen=True, slots=True)
class Settlement:
    gross: int
    refunds: int
    net_revenue: int
    payment_fees: int
    platform_fee: int
    net_platform_fee: int          # platform fee less payment fees (may be negative)
    cogs: int
    profit: int                    # distributable, >= 0
    shortfall: int                 # loss not covered, >= 0
    profit_platform: int
    profit_creator: int
    profit_investors: int
    investors: dict[str, int] = field(default_factory=dict)   # investor id -> share
    tips_gross: int = 0            # tips captured
    tips_refunds: int = 0
    tips_payment_fees: int = 0
    tips_platform_fee: int = 0     # platform_fee_bps of the tips net of refunds
    tips_creator: int = 0          # the tips net of refunds less the platform fee

    @property
    def creator_payout(self) -> int:
        return self.cogs + self.profit_creator + self.tips_creator

    @property
    def platform_total(self) -> int:
        return (self.net_platform_fee + self.profit_platform + self.tips_platform_fee
                - self.tips_payment_fees)


def settle(sales: Sequence[Sale], split: Split, stakes: dict[str, int] | None = None,
           tips: Sequence[Sale] = ()) -> Settlement:
    """The settlement of one drop's paid orders and paid tips (``tips``: a ``Sale``
    each, without COGS)."""
    stakes = {k: v for k, v in (stakes or {}).items() if v > 0}
    gross = sum(s.amount for s in sales)
    refunds = sum(min(s.refunded, s.amount) for s in sales)
    net = gross - refunds
    payment_fees = sum(s.payment_fee for s in sales)
    platform_fee = fee(net, split.platform_fee_bps)
    cogs = sum(s.cogs for s in sales if s.refunded < s.amount)
    remaining = net - platform_fee - cogs
    profit = max(remaining, 0)
    shortfall = max(-remaining, 0)
    p_platform, p_creator, p_investors = allocate(
        profit, [split.platform_bps, split.creator_bps, split.investors_bps])
    investors: dict[str, int] = {}
    if stakes:
        names = sorted(stakes)
        for name, share in zip(names, allocate(p_investors, [stakes[n] for n in names]),
                               strict=True):
            investors[name] = share
    else:
        p_creator += p_investors
        p_investors = 0
    tips_gross = sum(t.amount for t in tips)
    tips_refunds = sum(min(t.refunded, t.amount) for t in tips)
    tips_fee = fee(tips_gross - tips_refunds, split.platform_fee_bps)
    return Settlement(
        gross=gross, refunds=refunds, net_revenue=net, payment_fees=payment_fees,
        platform_fee=platform_fee, net_platform_fee=platform_fee - payment_fees,
        cogs=cogs, profit=profit, shortfall=shortfall, profit_platform=p_platform,
        profit_creator=p_creator, profit_investors=p_investors, investors=investors,
        tips_gross=tips_gross, tips_refunds=tips_refunds,
        tips_payment_fees=sum(t.payment_fee for t in tips), tips_platform_fee=tips_fee,
        tips_creator=tips_gross - tips_refunds - tips_fee)


def exact_share(total: int, weight: int, wsum: int) -> Fraction:
    """The exact (fractional) share, for tests and reports."""
    return Fraction(total * weight, wsum)
