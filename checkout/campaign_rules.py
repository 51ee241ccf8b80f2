"""The campaign deadline rule (pure): how long a group buy may run.

Authorizations lapse: Stripe cancels an uncaptured PaymentIntent 7 days after it was
created, 5 days for some Visa merchant-initiated payments
(https://docs.stripe.com/payments/place-a-hold-on-a-payment-method). A campaign whose
deadline is more than :data:`MAX_CAMPAIGN_SECONDS` (5 days) away is refused, so every
authorization taken during it can still be captured at the deadline. The order worker
applies the rule before authorizing a backer (:mod:`checkout.orders`) and the campaign
loop (:mod:`checkout.campaigns`) re-exports it for drop creation.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["MAX_CAMPAIGN_SECONDS", "CampaignTooLong", "check_deadline"]

# Visa merchant-initiated authorizations lapse after 5 days, all others after 7.
MAX_CAMPAIGN_SECONDS = 5 * 24 * 3600


class CampaignTooLong(ValueError):
    code = "campaign_too_long"


def check_deadline(deadline: datetime, now: datetime) -> None:
    """Raise :class:`CampaignTooLong` when authorizations taken now could lapse before
    ``deadline``, and ValueError when the deadline is already past."""
    if deadline <= now:
        raise ValueError("the campaign deadline must be in the future")
    if deadline - now > timedelta(seconds=MAX_CAMPAIGN_SECONDS):
        raise CampaignTooLong(
            "a campaign may run at most 5 days: card authorizations lapse after 5 to 7 "
            "days and could not be captured at the deadline")
