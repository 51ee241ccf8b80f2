"""The checkout package as mounted by dropserver.app: reservations, then payments."""

from checkout.payments_api import part as payments
from checkout.reservations_api import part as reservations
from dropserver.component import combine

component = combine("checkout", reservations, payments)
