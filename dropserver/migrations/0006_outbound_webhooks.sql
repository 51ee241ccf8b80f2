-- Outbound webhooks: events the server sends to endpoints creators and the platform
-- register (docs/topics/webhooks.md).
--
-- webhook_endpoints: an HTTPS URL, the event types it wants and its signing secret
--   (Standard Webhooks, whsec_...). scope 'creator' hears its owner's events; scope
--   'platform' (registered by an admin) hears every creator's. A rotated secret's
--   predecessor keeps signing beside it until previous_secret_expires_at.
-- outbound_events: the transactional outbox. dropserver.outbound.enqueue inserts one
--   row in the caller's transaction, so an event exists exactly when the state change
--   that caused it committed. body is the exact JSON every attempt sends (the
--   signature covers these bytes); dedupe_key makes a repeated enqueue a no-op.
--   fanned_out_at: when the dispatcher made its deliveries (NULL: not yet).
-- webhook_deliveries: one per (event, endpoint) -- the delivery log. state pending ->
--   delivered, or failed once the retry schedule is spent (a replay makes it pending
--   again). A delivery being attempted has next_attempt_at pushed past the attempt's
--   timeout (its lease): if the process dies mid-request it is simply due again.
-- webhook_attempts: every attempt: when, the HTTP status (NULL: no answer) and error.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id              BIGSERIAL PRIMARY KEY,
    owner_id        TEXT NOT NULL,                    -- the creator (or admin) who registered it
    scope           TEXT NOT NULL CHECK (scope IN ('creator', 'platform')),
    url             TEXT NOT NULL CHECK (length(url) BETWEEN 8 AND 2048),
    description     TEXT NOT NULL DEFAULT '',
    events          TEXT[] NOT NULL CHECK (cardinality(events) >= 1),
    secret          TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_expires_at TIMESTAMPTZ,
    enabled         BOOLEAN NOT NULL DEFAULT true,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_owner_idx ON webhook_endpoints (owner_id);

CREATE TABLE IF NOT EXISTS outbound_events (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,             -- "msg_..." = the webhook-id header
    type            TEXT NOT NULL,
    creator_id      TEXT,                             -- whose creator endpoints hear it
    drop_id         BIGINT,
    dedupe_key      TEXT UNIQUE,
    body            TEXT NOT NULL,                    -- the JSON sent, byte for byte
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    fanned_out_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS outbound_events_unfanned_idx ON outbound_events (seq)
    WHERE fanned_out_at IS NULL;

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    event_id        TEXT NOT NULL REFERENCES outbound_events(id),
    endpoint_id     BIGINT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INT NOT NULL DEFAULT 0,           -- every attempt, replays included
    step            INT NOT NULL DEFAULT 0,           -- attempts since created or replayed
    next_attempt_at TIMESTAMPTZ DEFAULT now(),        -- NULL once delivered or failed
    last_status     INT,
    last_error      TEXT,
    last_attempt_at TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint_idx
    ON webhook_deliveries (endpoint_id, id DESC);

CREATE TABLE IF NOT EXISTS webhook_attempts (
    id              BIGSERIAL PRIMARY KEY,
    delivery_id     BIGINT NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt         INT NOT NULL,
    status          INT,                              -- NULL: no HTTP answer
    error           TEXT,
    duration_ms     INT NOT NULL,
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery_idx ON webhook_attempts (delivery_id, id);
