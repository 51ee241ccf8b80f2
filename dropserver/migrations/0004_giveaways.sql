-- Giveaways: winners drawn among the viewers who entered (docs/topics/giveaways.md).
--
-- giveaways: one row per giveaway. Opened by the creator with a commitment
--   (SHA-256 of a secret seed, hex) published at once; the seed stays here, unread by
--   anyone but the drawer, until the draw publishes it. The entry window is decided
--   by Redis' clock (opened_at_ms, closes_at_ms); entries live in Redis while it is
--   open (drops/scripts/giveaway_enter.lua) and are copied here by the one process
--   that draws (state 'open' -> 'drawn' under the row lock), with the winners.
--   announced_at: when giveaway.drawn was published (NULL: the drawer, or the next
--   one, still has to award the prizes and announce).
-- giveaway_entrants: every distinct entrant, with the ticket the draw sorted
--   (HMAC-SHA256(seed, user id), hex) -- the published list is the tickets, not the
--   user ids. Written while the window is open by the process that took each entry
--   (a journal, off the hot path, so a Redis that restarts empty loses at most the
--   last fraction of a second of entries), and completed from Redis at the draw.
-- giveaway_winners: the winners in draw order (rank 1 first), the name announced
--   and, for a product prize, the zero-price order each one got (orders.public_id;
--   NULL with prize_error 'out_of_stock' when the product had no unit left).
-- orders: a prize is a zero-price order (no PaymentIntent): unit_price and amount
--   may be 0.
-- replay_moments.kind gains the giveaway moments (opened, drawn); the auction kinds
--   are listed too so that this file and the auctions migration agree whichever
--   lands first.
CREATE TABLE IF NOT EXISTS giveaways (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    creator_id      TEXT NOT NULL REFERENCES users(id),
    product_id      BIGINT REFERENCES products(id),   -- NULL: a prize described in text
    prize           TEXT NOT NULL CHECK (length(prize) BETWEEN 1 AND 200),
    winners         INT NOT NULL CHECK (winners BETWEEN 1 AND 100),
    must_be_present BOOLEAN NOT NULL DEFAULT true,
    must_have_bought BOOLEAN NOT NULL DEFAULT false,
    state           TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'drawn')),
    commitment      TEXT NOT NULL CHECK (commitment ~ '^[0-9a-f]{64}$'),
    seed            TEXT NOT NULL CHECK (seed ~ '^[0-9a-f]{64}$'),
    opened_at_ms    BIGINT NOT NULL,                  -- Redis' clock
    closes_at_ms    BIGINT NOT NULL,
    drawn_at_ms     BIGINT,
    entrants        INT,                              -- distinct entrants at the draw
    announced_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (closes_at_ms > opened_at_ms),
    CHECK (state <> 'drawn' OR (drawn_at_ms IS NOT NULL AND entrants IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS giveaways_drop_idx ON giveaways (drop_id, id);
-- One open giveaway per drop at a time (the live count and the page show one).
CREATE UNIQUE INDEX IF NOT EXISTS giveaways_open_idx ON giveaways (drop_id)
    WHERE state = 'open';
-- What the closers of every process look for.
CREATE INDEX IF NOT EXISTS giveaways_due_idx ON giveaways (closes_at_ms)
    WHERE state = 'open' OR announced_at IS NULL;

CREATE TABLE IF NOT EXISTS giveaway_entrants (
    giveaway_id     BIGINT NOT NULL REFERENCES giveaways(id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    ticket          TEXT NOT NULL,
    display_name    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (giveaway_id, user_id),
    UNIQUE (giveaway_id, ticket)
);

CREATE TABLE IF NOT EXISTS giveaway_winners (
    giveaway_id     BIGINT NOT NULL REFERENCES giveaways(id) ON DELETE CASCADE,
    rank            INT NOT NULL CHECK (rank >= 1),
    user_id         TEXT NOT NULL,
    ticket          TEXT NOT NULL,
    display_name    TEXT NOT NULL DEFAULT '',          -- as the entry's token said
    order_id        TEXT,                             -- orders.public_id of the prize
    prize_error     TEXT,
    PRIMARY KEY (giveaway_id, rank),
    UNIQUE (giveaway_id, user_id)
);

ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_unit_price_check;
ALTER TABLE orders ADD CONSTRAINT orders_unit_price_check CHECK (unit_price >= 0);
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_amount_check;
ALTER TABLE orders ADD CONSTRAINT orders_amount_check CHECK (amount >= 0);

ALTER TABLE replay_moments DROP CONSTRAINT IF EXISTS replay_moments_kind_check;
ALTER TABLE replay_moments ADD CONSTRAINT replay_moments_kind_check
    CHECK (kind IN ('buy_now', 'sold_out', 'pinned', 'closed', 'live', 'ended',
                    'auction_started', 'auction_bid', 'auction_closed',
                    'giveaway_opened', 'giveaway_drawn'));
