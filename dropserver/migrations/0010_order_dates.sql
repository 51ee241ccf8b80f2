-- When an order (or a tip) was paid and when it was refunded: the dates its receipt shows
-- (GET /v1/me/orders, GET /v1/orders/{id}/receipt).
--
-- orders.paid_at: set once, when the order first became paid (a lost-then-won dispute
--   keeps the first); NULL for an order never paid. A refund keeps it.
-- orders.refunded_at: set once, when the order became refunded.
-- Orders made before this migration get an estimate: the last change of their payment
-- (or of the order itself, for a prize with no payment).
ALTER TABLE orders ADD COLUMN IF NOT EXISTS paid_at TIMESTAMPTZ;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS refunded_at TIMESTAMPTZ;
UPDATE orders o SET paid_at = COALESCE(
        (SELECT p.updated_at FROM payments p WHERE p.order_id = o.id), o.updated_at)
    WHERE o.paid_at IS NULL AND (o.state IN ('paid', 'disputed')
        OR (o.state = 'refunded' AND o.released IS NULL));
UPDATE orders SET refunded_at = updated_at WHERE refunded_at IS NULL AND state = 'refunded';
-- tips.refunded_at: the same for a tip (its paid_at exists since tips were added)
ALTER TABLE tips ADD COLUMN IF NOT EXISTS refunded_at TIMESTAMPTZ;
UPDATE tips SET refunded_at = updated_at WHERE refunded_at IS NULL AND state = 'refunded';
-- a buyer's orders, newest first (GET /v1/me/orders)
CREATE INDEX IF NOT EXISTS orders_user_created_idx ON orders (user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS tips_user_created_idx ON tips (user_id, created_at DESC, id DESC);
