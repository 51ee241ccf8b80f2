-- Tips during the live (docs/topics/payments.md, "Tips").
--
-- drops.tip_amounts: the amounts (minor units of the drop's currency) a viewer may tip,
--   set by the creator; empty: tips are off.
-- tips: one row per tip, written before the gateway is asked (PostgreSQL first, as for
--   orders); its PaymentIntent's id and amounts are on the row itself (a tip is not an
--   order: no product, no hold). (user_id, drop_id, idempotency_key) makes a retried
--   request the same tip; the intent's idempotency key is "pi:tip:<public id>".
--   payment_requested: set before the gateway is asked, so a retry after a crash asks
--   again with the same key rather than losing a charge. announced: the room heard the
--   paid tip (the highlighted `tip` event).
-- ledger_entries.account gains the tips' accounts.
ALTER TABLE drops ADD COLUMN IF NOT EXISTS tip_amounts BIGINT[] NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS tips (
    id              BIGSERIAL PRIMARY KEY,
    public_id       TEXT NOT NULL UNIQUE,             -- "tip_..."
    drop_id         BIGINT NOT NULL REFERENCES drops(id),
    user_id         TEXT NOT NULL REFERENCES users(id),
    display_name    TEXT NOT NULL DEFAULT '',
    amount          BIGINT NOT NULL CHECK (amount > 0),
    currency        CHAR(3) NOT NULL,
    message         TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'payment_pending'
                    CHECK (state IN ('payment_pending', 'paid', 'failed', 'cancelled',
                                     'refunded')),
    payment_requested BOOLEAN NOT NULL DEFAULT false,
    gateway         TEXT CHECK (gateway IN ('fake', 'stripe')),
    intent_id       TEXT UNIQUE,
    status          TEXT,                             -- the PaymentIntent's status
    amount_received BIGINT NOT NULL DEFAULT 0 CHECK (amount_received >= 0),
    amount_refunded BIGINT NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    fee             BIGINT NOT NULL DEFAULT 0 CHECK (fee >= 0),
    last_error      TEXT,
    announced       BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    paid_at         TIMESTAMPTZ,
    UNIQUE (user_id, drop_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS tips_drop_idx ON tips (drop_id, state);
CREATE INDEX IF NOT EXISTS tips_open_idx ON tips (updated_at) WHERE state = 'payment_pending';

ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_account_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_account_check
    CHECK (account IN ('gross', 'payment_fees', 'platform_fee', 'cogs', 'profit_platform',
                       'profit_creator', 'profit_investor', 'refund', 'tips',
                       'tip_refunds', 'tip_payment_fees', 'tip_platform_fee',
                       'tips_creator'));
