"""The drops package as mounted by dropserver.app: lifecycle API, auctions, settlement,
giveaways, reminders."""

from drops.api import part as lifecycle
from drops.auctions import part as auctions
from drops.giveaway_api import part as giveaways
from drops.reminders import part as reminders
from drops.settlement_api import part as settlement
from dropserver.component import combine

component = combine("drops", lifecycle, auctions, settlement, giveaways, reminders)
