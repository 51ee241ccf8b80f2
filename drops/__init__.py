"""Drops: a creator's show, from draft to settled, and the money afterwards.

Owns the drop lifecycle (draft, scheduled, live, selling, sold out, closed, ended,
settled), the creator's HTTP API that drives it, settlement (the ledger, the payouts
and the report) and giveaways (docs/topics/giveaways.md). Stock in Redis belongs to
:mod:`checkout` (this package calls :mod:`checkout.inventory` at go-live, BUY NOW and
close, and :mod:`checkout.prizes` for a giveaway's prizes); viewers hear of every
transition through :mod:`realtime.publish`. Checkout and settlement move a drop with
the system actions in :mod:`drops.actions` (``mark_sold_out``, ``mark_back_in_stock``,
``mark_settled``). Design: docs/topics/lifecycle.md; endpoints: docs/http-api.md.

Modules, in the order to read them:

* ``lifecycle``: the state machine: states, actions, what is legal; pure.
* ``spec``: creator input to typed drop and product specs; pure validation.
* ``store``: PostgreSQL rows in, plain dicts out; imports nothing above it.
* ``actions``: each action under the drop's row lock: legality, Redis, broadcast.
* ``api``: the creator's HTTP routes for the lifecycle.
* ``auctions``: the creator's auctions (start, second chance) and reading them.
* ``settlement``: settlement arithmetic in integer minor units; pure.
* ``settlement_store``: a drop's sales read, its ledger written, payouts sent.
* ``settlement_api``: stakes, settle and the settlement report over HTTP.
* ``giveaway``: a giveaway's provably fair draw (commitment, tickets, shuffle); pure.
* ``giveaway_store``: giveaways in PostgreSQL and Redis: enter, close and draw once,
  award, announce, audit.
* ``giveaway_api``: giveaways over HTTP and the ``giveaway.enter`` command, the live
  entry count, the closer every process runs.
* ``reminders``: "Remind me" on a scheduled drop; the reminders 10 minutes before the
  start and at go-live, handed to the outbound notification once across processes.
* ``scripts``: the giveaway Lua scripts (``giveaway_open``, ``giveaway_enter``,
  ``giveaway_close``, ``giveaway_restore``), called by SHA.
* ``component``: the package as :mod:`dropserver.app` mounts it.
"""
