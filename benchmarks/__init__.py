"""Benchmarks: runnable scripts that measure dropserver's speed and memory.

Not part of the product: the wheel leaves this package out. Each public module is one
benchmark, run from the repository root as ``python -m benchmarks.<name>`` (``--help``
for its options); docs/benchmarks.md has their figures with the exact command, the
machine and the date. Each measures dropserver against a baseline taken in the same
run. In the order of the hot paths:

* :mod:`benchmarks.reserve`: the buy path, reservations per second from socket to
  ``reserve.lua`` and back, against raw EVALSHA and a bare buy server.
* :mod:`benchmarks.buy_cpu`: the server's CPU per buy command in a rush, refused
  (a sold-out product) and held, with a py-spy profile of the workers.
* :mod:`benchmarks.reserve_script`: Redis' own time per ``reserve.lua`` call, a product
  without variants against a variant of one (and against another version of the
  script), alternating in one Valkey.
* :mod:`benchmarks.fanout`: BUY NOW to every viewer (latency, server CPU per
  delivery, memory per idle connection), against a bare ``websockets.broadcast()``.
* :mod:`benchmarks.bids`: bids per second through the socket path, accepted or
  refused, every answer checked (a bid to every viewer is ``fanout``'s
  ``gateway-bids``).
* :mod:`benchmarks.giveaway`: giveaway entries per second from socket to
  ``giveaway_enter.lua`` and back (50,000 by default), the draw audited, against raw
  EVALSHA of the same script.
* :mod:`benchmarks.idle`: a node with one live drop and no viewers: the CPU its workers,
  Redis and PostgreSQL spend idle, and how often it polls them.
* :mod:`benchmarks.churn`: whether a worker gives back the memory of viewers who left.
* :mod:`benchmarks.buy_now`: the creator's BUY NOW until it is on the drop's channel.
* :mod:`benchmarks.orders`: the order workers, holds in the stream to paid orders.
* :mod:`benchmarks.ingest`: one 720p30 stream's server CPU, publish-to-playlist and
  glass-to-viewer latency.
* :mod:`benchmarks.hls_cdn`: LL-HLS viewers behind nginx as a caching proxy: origin
  requests per second per 1,000 viewers and part latency, against viewers straight
  at the origin.
* :mod:`benchmarks.startup`: ``dropserver dev`` from launch to ready.
* :mod:`benchmarks.balancer`: a rehearsal through HAProxy across 3 nodes against one
  node with as many workers, and a node killed or drained mid-drop: how long until
  every viewer is back and caught up, events and holds lost (root: namespaces).
* :mod:`benchmarks.join_burst`: one worker taking a crashed node's viewers back at
  once (each joining with its position): when they were back, CPU per join, and
  where it went (py-spy); its baseline is the code before a change, in the same hold.
* :mod:`benchmarks.faults`: every fault of the fault tests in a loop during a rush
  (PostgreSQL down, Redis restarted empty, workers killed): holds lost, refunds
  unrecorded, double charges, recovery times.
* :mod:`benchmarks.failover`: Redis Cluster primaries killed mid-rush in a loop:
  units oversold, acknowledged holds lost, time until sales resume.
* :mod:`benchmarks.swarm_recv`: the load generator's own CPU per frame and per chat
  message it reads (the rehearsal's viewers share the server's cores), one generator
  against another in the same run.
* :mod:`benchmarks.cluster_clients`: the buy path's Redis call on a cluster through
  each candidate client (redis-py, its auto-pipeline with and without WAIT,
  valkey-glide, coredis).

What they share (not benchmarks themselves):

* :mod:`benchmarks._support`: the servers under test (``dropserver serve``,
  ``dropserver dev``), schema and a live drop, process CPU and memory, percentiles.
* :mod:`benchmarks._buyers`: the WebSocket buyers and the rush (also used by tests).
* :mod:`benchmarks._bare`: the bare servers the baselines are measured on.
* :mod:`benchmarks._stream`: the streaming benchmark's server per case and its
  playlist watcher.
"""
