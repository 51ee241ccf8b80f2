"""Real-time gateway: every viewer's WebSocket, and each drop event on all of them.

Owns ``/ws``: the wire protocol, joining a drop, commands from a socket, fan-out of a
drop's events from its Redis pub/sub channel to the sockets of every process and node,
resume from history, viewer counts and chat. Other packages reach viewers only through
:mod:`realtime.publish`. The wire protocol is docs/protocol.md; the design and its
measurements are docs/topics/realtime.md.

Modules, in the order to read them:

* ``protocol``: frames, codes, encoding and validation; pure, no I/O.
* ``channels``: Redis key and channel names, the pub/sub message format; pure.
* ``publish``: ``publish``, ``publish_many``, ``publish_volatile``, ``publish_user``:
  what others call.
* ``history``: a drop's current position; exact recovery or none.
* ``subscriber``: the process's one pub/sub connection; notices loss, resubscribes.
* ``sharded_subscriber``: on a Redis Cluster, one such connection per shard
  (SSUBSCRIBE), channels following slot moves and failovers.
* ``hub``: the process's viewers by drop and by user; publications to their rooms.
* ``private``: private events a socket missed (no user-channel history): recovered
  from the owner's current state, each heard once.
* ``room``: one drop's viewers: its stream in order, gap filling, coalescing, chat
  carried in front of drop events.
* ``chatstream``: a big room's chat as a bounded stream: batches, a fair sample.
* ``dispatch``: the process's fan-out queue: drop events first, in short slices.
* ``board``: which of the node's workers is writing a drop event (their viewers'
  commands wait for all of them).
* ``wire``: a message encoded and framed once for every socket; its lane.
* ``connection``: one socket's bounded two-lane send queue; a client that cannot keep
  up is closed.
* ``gateway``: the ``/ws`` endpoint: accept or refuse, join, commands, drain.
* ``tokens``: a socket's token over its life: expiry (the socket becomes a guest's)
  and ``refresh``.
* ``asgi``: ``/ws`` served lean under uvicorn (memory per socket, frames below ASGI).
* ``heartbeat``: pings in slices over the interval; silent sockets closed.
* ``snapshot``: what a viewer sees on joining, briefly cached per process.
* ``presence``: viewer counts across processes and nodes.
* ``chat``: drop chat, its limits, pins and moderation.
* ``moderators``: the moderators a creator appoints (HTTP), their per-process cache,
  the moderation audit.
* ``component``: the package as :mod:`dropserver.app` mounts it.
* ``metrics``, ``_lua`` (``scripts/*.lua``): Prometheus metrics; the Redis scripts.
* ``watch``: ``python -m realtime.watch URL DROP``: a drop's frames in the terminal.
"""
