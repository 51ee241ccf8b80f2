"""Checkout: reservation scripts, order queue, payments, webhooks."""
