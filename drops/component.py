"""The drops package as mounted by dropserver.app: lifecycle API, auctions, then
settlement."""

from drops.api import part as lifecycle
from drops.auctions import part as auctions
from drops.settlement_api import part as settlement
from dropserver.component import combine

component = combine("drops", lifecycle, auctions, settlement)
