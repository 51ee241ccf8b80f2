"""dropserver: the composition package.

It holds what every domain package shares (settings, auth, HTTP errors, logging,
metrics, database and Redis connections, outbound webhooks), the launcher for local
backing services, the CLI, and :func:`dropserver.app.create_app`, which builds the
Starlette app from the routes of ``realtime``, ``drops``, ``checkout`` and ``streaming``. A reader
looking for where something is handled starts at ``app`` and follows its imports.

Modules, in the order to read them:

* ``app``: the application: shared connections plus every domain package's routes.
* ``component``: what a domain package hands to the app: routes and lifecycle hooks.
* ``settings``: one typed settings object, read from environment variables
  (docs/configuration.md).
* ``auth``: token verification (PyJWT) and role checks.
* ``errors``: the one error format of every 4xx and 5xx answer.
* ``text``: what counts as storable text (no NUL, no unpaired surrogate); pure.
* ``http``: JSON bodies, typed field access and the input rules every endpoint keeps
  (ids in paths, text, integers, NUL in URLs).
* ``openapi``: the HTTP API as an OpenAPI 3.1 document (``GET /openapi.json``).
* ``observability``: structured logs with context (secrets redacted), Prometheus
  metrics.
* ``redis_client``: one Redis or a Redis Cluster, chosen by ``REDIS_URL``
  (``redis+cluster://``); what differs on a cluster (sharded publish, scripts).
* ``db``: the asyncpg pool and versioned migrations (``migrations/``, ``schema.sql``).
* ``background``: a step run every few seconds until the process stops.
* ``chores``: which worker of a node runs the node's chores (hold sweeper, recovery,
  auction keeper, ...): worker 0 of ``serve``, or a process that is the whole node.
* ``outbound``: outbound webhooks' events and :func:`~dropserver.outbound.enqueue`
  (one outbox row in the caller's transaction), Standard Webhooks signing, the
  endpoint URL rule.
* ``outbound_delivery``: the outbox's consumer: fan-out to endpoints, claim with a
  lease, send, retry with backoff, replay.
* ``outbound_api``: webhook endpoints, the delivery log and replay over HTTP; the
  dispatcher's start and stop.
* ``web``: the viewer's live page and the creator's console, with their assets.
* ``serve``: one process, or N workers sharing a port; draining.
* ``lifeline``: a child process dies with its parent, however the parent dies.
* ``cli``: the ``dropserver`` command: dev, serve, migrate, token, services.
* ``services``: a local Redis and PostgreSQL for ``dropserver dev`` and the tests.
* ``local_cluster``: the local Redis Cluster (3 primaries, 3 replicas) that
  ``services`` starts for ``dropserver dev --redis-cluster`` and the tests.
* ``_reaper``: cleans up after ``services`` when its parent dies, however it dies.
"""

__version__ = "0.1.0"
