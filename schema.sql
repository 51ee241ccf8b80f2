-- dropserver relational model, schema version 1.
--
-- PostgreSQL is the source of truth: Redis holds hot copies (stock, holds, buyer
-- counters, event history) that can be rebuilt from these tables.
-- Money is always integer minor units (cents) beside an ISO 4217 currency.
-- States are CHECK-constrained; UNIQUE constraints make retries idempotent.
-- Applied by `dropserver migrate` (dropserver/db.py); later changes go in
-- dropserver/migrations/NNNN_name.sql and are applied in order, once each.

-- ---------------------------------------------------------------------------
-- people
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS users (
    id              TEXT PRIMARY KEY,                 -- the IdP's `sub`
    display_name    TEXT NOT NULL DEFAULT '',
    role            TEXT NOT NULL DEFAULT 'viewer'
                    CHECK (role IN ('viewer', 'creator', 'admin', 'investor')),
    stripe_customer_id TEXT UNIQUE,
    default_payment_method TEXT,                      -- saved card for one-tap buys
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS creators (
    user_id         TEXT PRIMARY KEY REFERENCES users(id),
    handle          TEXT UNIQUE,
    stripe_account_id TEXT UNIQUE,                    -- Connect account for payouts
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------
-- catalogue and drops
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS products (
    id              BIGSERIAL PRIMARY KEY,
    creator_id      TEXT NOT NULL REFERENCES users(id),
    title           TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description     TEXT NOT NULL DEFAULT '',
    image_url       TEXT NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS drops (
    id              BIGSERIAL PRIMARY KEY,
    creator_id      TEXT NOT NULL REFERENCES users(id),
    title           TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description     TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL DEFAULT 'standard'
                    CHECK (kind IN ('standard', 'campaign')),
    state           TEXT NOT NULL DEFAULT 'draft'
                    CHECK (state IN ('draft', 'scheduled', 'live', 'selling',
                                     'sold_out', 'closed', 'ended', 'settled')),
    currency        CHAR(3) NOT NULL DEFAULT 'usd',
    starts_at       TIMESTAMPTZ,                      -- countdown target
    pinned_product_id BIGINT,
    selling_product_id BIGINT,                        -- product under BUY NOW
    max_holds_per_user INT NOT NULL DEFAULT 1 CHECK (max_holds_per_user >= 1),
    -- settlement split, basis points of distributable profit (sum 10000)
    platform_fee_bps INT NOT NULL DEFAULT 1000 CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    split_platform_bps INT NOT NULL DEFAULT 2500,
    split_creator_bps  INT NOT NULL DEFAULT 2500,
    split_investors_bps INT NOT NULL DEFAULT 5000,
    -- campaign drops (group buy): goal and deadline
    campaign_goal_orders INT CHECK (campaign_goal_orders IS NULL OR campaign_goal_orders > 0),
    campaign_deadline TIMESTAMPTZ,
    campaign_outcome TEXT CHECK (campaign_outcome IN ('pending', 'succeeded', 'failed')),
    version         INT NOT NULL DEFAULT 0,           -- optimistic concurrency
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    live_at         TIMESTAMPTZ,
    ended_at        TIMESTAMPTZ,
    CHECK (split_platform_bps >= 0 AND split_creator_bps >= 0 AND split_investors_bps >= 0
           AND split_platform_bps + split_creator_bps + split_investors_bps = 10000),
    CHECK (kind <> 'campaign' OR (campaign_goal_orders IS NOT NULL
                                  AND campaign_deadline IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS drops_creator_idx ON drops (creator_id);
CREATE INDEX IF NOT EXISTS drops_state_idx ON drops (state);

CREATE TABLE IF NOT EXISTS drop_products (
    drop_id         BIGINT NOT NULL REFERENCES drops(id) ON DELETE CASCADE,
    product_id      BIGINT NOT NULL REFERENCES products(id),
    position        INT NOT NULL DEFAULT 0,
    price           BIGINT NOT NULL CHECK (price > 0),           -- minor units
    units           INT NOT NULL CHECK (units >= 0),
    per_buyer_limit INT NOT NULL DEFAULT 1 CHECK (per_buyer_limit >= 1),
    cogs            BIGINT NOT NULL DEFAULT 0 CHECK (cogs >= 0), -- per unit, minor units
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'selling', 'sold_out', 'closed')),
    selling_at      TIMESTAMPTZ,
    PRIMARY KEY (drop_id, product_id)
);

CREATE TABLE IF NOT EXISTS drop_transitions (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id) ON DELETE CASCADE,
    from_state      TEXT NOT NULL,
    to_state        TEXT NOT NULL,
    actor_id        TEXT,
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS drop_transitions_drop_idx ON drop_transitions (drop_id, id);

-- ---------------------------------------------------------------------------
-- checkout: holds -> orders -> payments
-- ---------------------------------------------------------------------------
-- A hold is the durable record of a Redis reservation; Redis is rebuilt from it.
CREATE TABLE IF NOT EXISTS orders (
    id              BIGSERIAL PRIMARY KEY,
    public_id       TEXT NOT NULL UNIQUE,             -- hold id issued by reserve.lua
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    product_id      BIGINT NOT NULL REFERENCES products(id),
    user_id         TEXT NOT NULL REFERENCES users(id),
    quantity        INT NOT NULL DEFAULT 1 CHECK (quantity >= 1),
    buyer_number    INT NOT NULL CHECK (buyer_number >= 1),
    unit_price      BIGINT NOT NULL CHECK (unit_price > 0),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    currency        CHAR(3) NOT NULL,
    idempotency_key TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'held'
                    CHECK (state IN ('held', 'payment_pending', 'authorized', 'paid',
                                     'failed', 'expired', 'cancelled', 'refunded',
                                     'disputed')),
    hold_expires_at TIMESTAMPTZ NOT NULL,
    payment_flow    TEXT NOT NULL DEFAULT 'client_confirm'
                    CHECK (payment_flow IN ('client_confirm', 'off_session', 'manual_capture')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (drop_id, product_id, buyer_number),
    UNIQUE (user_id, drop_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS orders_drop_idx ON orders (drop_id, state);
CREATE INDEX IF NOT EXISTS orders_user_idx ON orders (user_id);

CREATE TABLE IF NOT EXISTS payments (
    id              BIGSERIAL PRIMARY KEY,
    order_id        BIGINT NOT NULL UNIQUE REFERENCES orders(id),
    gateway         TEXT NOT NULL CHECK (gateway IN ('fake', 'stripe')),
    intent_id       TEXT NOT NULL UNIQUE,             -- Stripe PaymentIntent id
    idempotency_key TEXT NOT NULL UNIQUE,             -- "pi:<order public id>"
    status          TEXT NOT NULL,                    -- Stripe's PaymentIntent status
    amount          BIGINT NOT NULL CHECK (amount >= 0),
    amount_received BIGINT NOT NULL DEFAULT 0 CHECK (amount_received >= 0),
    amount_refunded BIGINT NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    fee             BIGINT NOT NULL DEFAULT 0 CHECK (fee >= 0),  -- gateway fee
    currency        CHAR(3) NOT NULL,
    capture_method  TEXT NOT NULL DEFAULT 'automatic'
                    CHECK (capture_method IN ('automatic', 'manual')),
    capture_before  TIMESTAMPTZ,
    transfer_group  TEXT,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS webhook_events (
    id              TEXT PRIMARY KEY,                 -- Stripe event id: duplicates no-op
    type            TEXT NOT NULL,
    object_id       TEXT,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at    TIMESTAMPTZ,
    payload         JSONB NOT NULL
);

-- ---------------------------------------------------------------------------
-- campaigns (group buy / crowdfunding) and investors
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS campaign_backers (
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    order_id        BIGINT NOT NULL UNIQUE REFERENCES orders(id),
    user_id         TEXT NOT NULL REFERENCES users(id),
    state           TEXT NOT NULL DEFAULT 'authorized'
                    CHECK (state IN ('authorized', 'captured', 'cancelled', 'failed')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (drop_id, order_id)
);

CREATE TABLE IF NOT EXISTS investor_stakes (
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    investor_id     TEXT NOT NULL REFERENCES users(id),
    amount          BIGINT NOT NULL CHECK (amount > 0),   -- capital staked, minor units
    currency        CHAR(3) NOT NULL,
    stripe_account_id TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (drop_id, investor_id)
);

-- ---------------------------------------------------------------------------
-- settlement: an append-only double-entry-style ledger and payouts
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS ledger_entries (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    order_id        BIGINT REFERENCES orders(id),
    account         TEXT NOT NULL
                    CHECK (account IN ('gross', 'payment_fees', 'platform_fee', 'cogs',
                                       'profit_platform', 'profit_creator',
                                       'profit_investor', 'refund')),
    party_id        TEXT,                             -- user id for creator/investor rows
    amount          BIGINT NOT NULL,                  -- signed: reversals are negative
    currency        CHAR(3) NOT NULL,
    memo            TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_drop_idx ON ledger_entries (drop_id, account);

CREATE TABLE IF NOT EXISTS payouts (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    party_id        TEXT NOT NULL REFERENCES users(id),
    role            TEXT NOT NULL CHECK (role IN ('creator', 'investor', 'platform')),
    amount          BIGINT NOT NULL CHECK (amount >= 0),
    currency        CHAR(3) NOT NULL,
    transfer_group  TEXT NOT NULL,                    -- "drop_<id>"
    transfer_id     TEXT UNIQUE,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'failed', 'reversed')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (drop_id, party_id, role)
);

-- ---------------------------------------------------------------------------
-- chat moderation
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS chat_moderation (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT REFERENCES drops(id),      -- NULL: applies to every drop
    creator_id      TEXT REFERENCES users(id),        -- a creator's ban covers their drops
    user_id         TEXT NOT NULL,
    action          TEXT NOT NULL CHECK (action IN ('mute', 'ban', 'delete')),
    message_id      TEXT,
    reason          TEXT NOT NULL DEFAULT '',
    moderator_id    TEXT NOT NULL,
    expires_at      TIMESTAMPTZ,                      -- NULL: until lifted
    lifted_at       TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS chat_moderation_user_idx ON chat_moderation (user_id, action);

-- ---------------------------------------------------------------------------
-- streaming
-- ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS stream_sessions (
    id              TEXT PRIMARY KEY,                 -- WHIP resource id
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    creator_id      TEXT NOT NULL REFERENCES users(id),
    state           TEXT NOT NULL DEFAULT 'live'
                    CHECK (state IN ('connecting', 'live', 'reconnecting', 'ended', 'failed')),
    video_codec     TEXT,
    audio_codec     TEXT,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at        TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS stream_sessions_drop_idx ON stream_sessions (drop_id);

CREATE TABLE IF NOT EXISTS replays (
    drop_id         BIGINT PRIMARY KEY REFERENCES drops(id),
    playlist_path   TEXT NOT NULL,
    duration_ms     BIGINT NOT NULL DEFAULT 0 CHECK (duration_ms >= 0),
    finalized_at    TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS replay_moments (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    kind            TEXT NOT NULL CHECK (kind IN ('buy_now', 'sold_out', 'pinned',
                                                  'closed', 'live', 'ended')),
    product_id      BIGINT,
    media_ms        BIGINT NOT NULL CHECK (media_ms >= 0),  -- offset into the replay
    at              TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS replay_moments_drop_idx ON replay_moments (drop_id, media_ms);
