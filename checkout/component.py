"""The checkout package as mounted by dropserver.app: reservations, auctions (which use
the reservations' pipeline, notifier and journal), payments, then tips (which use the
payments' gateway), then a buyer's receipts (reads only)."""

from checkout.auctions_api import part as auctions
from checkout.payments_api import part as payments
from checkout.receipts_api import part as receipts
from checkout.reservations_api import part as reservations
from checkout.tips_api import part as tips
from dropserver.component import combine

component = combine("checkout", reservations, auctions, payments, tips, receipts)
