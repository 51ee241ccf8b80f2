"""Load-test kit: rehearse a drop with tens of thousands of viewers before the real one.

Owns ``python -m loadtest rehearse`` (one command: start or point at a server, connect
N viewers, run a whole drop through the creator's API, judge it and write a report),
the high-density swarm that holds 50,000 viewers from one machine, and Locust users
for scenarios of your own. The guide and what each figure means: docs/loadtest.md.

Modules, in the order to read them:

* ``viewer``: one rehearsal viewer as a pure state machine: frames in, frames out.
* ``viewer_summary``: what a swarm reports of its viewers: raw times and totals.
* ``wsclient``: a lean asyncio WebSocket client for tens of thousands of sockets.
* ``swarm``: one swarm process: thousands of viewers of one drop on one loop.
* ``creator``: the creator's side: one drop driven through the HTTP API.
* ``target``: where a rehearsal points: a local server it starts, a deployment, or
  the cluster harness's balancer.
* ``floor``: the bare ``websockets`` broadcast server a rehearsal measures beside it,
  and the rush floor: the same server answering buys (``floor_take.lua``).
* ``floor_viewer``: the floor's viewer: it times each numbered broadcast, and on the
  rush floor buys as a drop's viewer does.
* ``procstat``: the server's memory and CPU during a run.
* ``stats``: percentiles, latency summaries, histograms; pure.
* ``fault``: a fault injected in a rehearsal's rush, and how the viewers came back.
* ``rehearse``: the whole rehearsal, phase by phase.
* ``swarm_pipes``: the rehearsal's end of its swarm processes: pipes, progress, reports.
* ``figures``: the swarms' reports merged into the rehearsal's result.
* ``verdict``: the orders audited, BUY NOW beside the floors, and pass or fail.
* ``auction_rehearsal``: ``rehearse --scenario auction``: bidding wars among
  thousands in auctions' last seconds, each audited against PostgreSQL.
* ``giveaway``: the rehearsal's giveaway scenario: the phase, its figures, the draw
  audited from PostgreSQL against what viewers were shown.
* ``rehearse_cli``: ``python -m loadtest rehearse``'s options.
* ``report``: the result as JSON, charts and an HTML page.
* ``netns``: the multi-node harness's network: a bridge, a namespace per node.
* ``_netreaper``: deletes those namespaces and devices when the harness ends, however.
* ``balancer``: HAProxy in front of the nodes: its configuration (``haproxy.cfg``),
  processes and view of the nodes.
* ``cdn``: nginx as a caching proxy in front of the LL-HLS origin (a CDN edge): its
  configuration (``nginx-cdn.conf``) and process.
* ``hls_viewers``: simulated LL-HLS viewers, thousands per process over raw HTTP/1.1,
  each part timed from the origin writing it to a viewer holding it.
* ``cluster``: several ``dropserver serve`` nodes behind HAProxy on this machine,
  over one Redis and one PostgreSQL; nodes killed, drained and started again.
* ``cluster_cli``: ``python -m loadtest cluster up|status|kill|drain|start|down``.
* ``__main__``: ``python -m loadtest`` (``rehearse``, ``cluster``, or one ``swarm``
  process).
* ``locustfile``: Locust users: viewers on the WebSocket, a creator on HTTP.
"""
