-- Auctions: a product of a drop sold to the highest bidder in a short timed auction
-- (docs/topics/auctions.md).
--
-- auctions: one row per auction, written by the creator's start (state 'running') and
--   by the closer once Redis decided the close (state 'closed' with its outcome). The
--   bidding itself lives in Redis (checkout/scripts/bid.lua); PostgreSQL gets every
--   accepted bid off the hot path (auction_bids) and is what the audit recomputes the
--   winner from.
-- auction_bids: every accepted bid, in the order bid.lua accepted them (seq), with the
--   end time it left and whether it extended the clock. Refused bids are not kept.
-- replay_moments.kind gains the auction moments (start, each bid, the close); the
--   giveaway kinds are listed too, so that this file and the giveaways migration
--   (0004) agree whichever lands first.
CREATE TABLE IF NOT EXISTS auctions (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    product_id      BIGINT NOT NULL REFERENCES products(id),
    creator_id      TEXT NOT NULL REFERENCES users(id),
    state           TEXT NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'closed')),
    currency        CHAR(3) NOT NULL,
    start_price     BIGINT NOT NULL CHECK (start_price > 0),       -- minor units
    increments      JSONB NOT NULL,                   -- [[from_price, step], ...] ascending
    reserve_price   BIGINT CHECK (reserve_price IS NULL OR reserve_price > 0),
    duration_ms     INT NOT NULL CHECK (duration_ms > 0),
    snipe_window_ms INT NOT NULL CHECK (snipe_window_ms >= 0),
    started_at_ms   BIGINT NOT NULL,                  -- Redis' clock
    ends_at_ms      BIGINT NOT NULL,                  -- the first end time
    closed_at_ms    BIGINT,
    final_ends_at_ms BIGINT,                          -- the end time the close met
    outcome         TEXT CHECK (outcome IN ('sold', 'reserve_not_met', 'no_bids',
                                            'no_stock')),
    bids            INT NOT NULL DEFAULT 0,           -- accepted bids when it closed
    winner_id       TEXT,
    winning_amount  BIGINT,
    winning_seq     INT,
    hold_id         TEXT,                             -- the winner's hold (orders.public_id)
    offer_user_id   TEXT,                             -- a second-chance offer's bidder
    offer_amount    BIGINT,
    offer_hold_id   TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (state <> 'closed' OR outcome IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS auctions_drop_idx ON auctions (drop_id, id);
-- One running auction per product.
CREATE UNIQUE INDEX IF NOT EXISTS auctions_running_idx ON auctions (drop_id, product_id)
    WHERE state = 'running';

CREATE TABLE IF NOT EXISTS auction_bids (
    auction_id      BIGINT NOT NULL REFERENCES auctions(id) ON DELETE CASCADE,
    seq             INT NOT NULL CHECK (seq >= 1),    -- bid.lua's order of acceptance
    user_id         TEXT NOT NULL,
    display_name    TEXT NOT NULL DEFAULT '',
    amount          BIGINT NOT NULL CHECK (amount > 0),
    at_ms           BIGINT NOT NULL,                  -- Redis' clock when accepted
    ends_at_ms      BIGINT NOT NULL,                  -- the end time after this bid
    extended        BOOLEAN NOT NULL,
    idempotency_key TEXT NOT NULL,
    PRIMARY KEY (auction_id, seq)
);

ALTER TABLE replay_moments DROP CONSTRAINT IF EXISTS replay_moments_kind_check;
ALTER TABLE replay_moments ADD CONSTRAINT replay_moments_kind_check
    CHECK (kind IN ('buy_now', 'sold_out', 'pinned', 'closed', 'live', 'ended',
                    'auction_started', 'auction_bid', 'auction_closed',
                    'giveaway_opened', 'giveaway_drawn'));
