"""Checkout: the buy, from BUY NOW to money kept; never oversell, never charge twice.

Owns a drop's stock in Redis and everything a buy sets off: the reservation (one
atomic Lua script called by SHA, ``scripts/reserve.lua``), holds and their expiry, bot
defence, rebuilding Redis from PostgreSQL after a loss and reconciling the two after
any fault, the order workers that turn holds into orders and payments, the payment
gateway (Stripe, or a deterministic fake), Stripe webhooks and campaign drops
(authorize now, capture at the deadline).
PostgreSQL is the source of truth and is written off the hot path. The drops package
calls :mod:`checkout.inventory`; checkout asks :mod:`drops.actions` to mark a product
sold out or back in stock. Design: docs/topics/checkout.md, docs/topics/payments.md.

Modules, in the order to read them:

* ``keys``: Redis key names (one hash tag per drop) and hold ids.
* ``scripts``: the Lua scripts (``prewarm``, ``open_sales``, ``close_sales``,
  ``reserve``, ``release``, ``settle``, ``award``; the auction scripts), loaded once,
  called by SHA.
* ``inventory``: stock for the drops package: prewarm, open and close sales, remaining.
* ``reserve``: the buy decision: request, reply, refusal codes; the EVALSHA call and
  its batcher.
* ``redis_pipe``: auto-pipelining on one Redis connection, the buy path's adapter.
* ``cluster_pipe``: the same on a Redis Cluster: one auto-pipeline per primary,
  commands routed by slot, MOVED/ASK followed.
* ``defense``: attempt limits, velocity, the verifier hook.
* ``holds``: after the buy: expiry, cancel, paid, lookup.
* ``reservations_api``: the ``buy`` and ``cancel_hold`` commands, HTTP routes,
  notifications to others, the sweeper and recovery loops.
* ``auction_rules``: auctions' rules (pure): the creator's spec, increments, bid
  refusals, the audit's replay of accepted bids.
* ``auction``: auctions in Redis: start, bid (``bid.lua``, one atomic step that also
  publishes ``auction.bid``), close once by Redis' clock, second-chance offer.
* ``auction_store``: auctions and every accepted bid in PostgreSQL; the bid journal.
* ``auction_events``: a bidder's private auction events that a socket missed, from
  PostgreSQL (the hub's recovery source).
* ``auctions_api``: the ``bid`` command and route; the keeper that closes auctions,
  hands the winner's hold to the order pipeline, records bids and puts back auctions a
  Redis loss took.
* ``recovery``: a drop's Redis state rebuilt from PostgreSQL.
* ``journal``: each acknowledged hold written to PostgreSQL by the process that made it.
* ``reconcile``: Redis' holds and counters compared with PostgreSQL, repaired.
* ``payment_types``: intents, charges, refunds, the ``Gateway`` protocol (pure).
* ``stripe_gateway``: Stripe behind that protocol.
* ``fake_gateway``: a deterministic gateway held to Stripe's rules.
* ``payments``: picks the gateway; the names callers import.
* ``order_entries``: the order stream's entries as typed values (pure).
* ``order_states``: order states, transitions, what an intent status means (pure).
* ``prizes``: a giveaway winner's prize unit: a zero-price settled hold (``award.lua``)
  that the order worker records like a buy.
* ``retry``: which failures are outages, backoff, one step until done.
* ``order_rows``: a hold's ``orders`` row, the one insert the worker and the journal
  share, against a rebuild's read.
* ``order_events``: what the buyer hears about an order, published once.
* ``refunds``: refunding a payment in full, as orders and tips both do.
* ``orders``: the order processor: entries, intents, refunds applied; the buyer told.
* ``campaign_rules``: how long a campaign may run (pure).
* ``compensations``: undoing an order that cannot go through, step by step.
* ``dead_letters``: entries given up on, parked, compensated.
* ``order_worker``: the consumer group loop; outages waited out.
* ``tips``: tips during the live: the tip row first, its PaymentIntent, paid by the
  intent (webhook ``tip.paid`` in the same transaction), the room's ``tip`` event,
  refunds, the sweep that repairs what a lost webhook or a crash left.
* ``webhooks``: Stripe webhooks: verify, deduplicate, re-read, apply (orders, and
  tips for an intent that is no order's).
* ``receipts``: what a buyer bought: their orders and tips as receipts (items,
  variant, amounts, payment reference, dates, state), paged by an opaque cursor.
* ``receipts_api``: ``GET /v1/me/orders`` and an order's receipt route.
* ``campaigns``: campaign drops: the goal, the deadline, capture or cancel.
* ``payments_api``: order workers, gateway, webhook and order routes as mounted.
* ``tips_api``: the tip routes (the creator's amounts, send, read, refund, the dev
  confirm) and the sweep's loop.
* ``component``: the package as :mod:`dropserver.app` mounts it (reservations, then
  payments).
"""
