-- Two facts about an order that its state alone does not carry.
--
-- released: why the hold's units went back to stock (expired, cancelled, failed), or
--   NULL while they are sold or held. A refunded order keeps it, so recovery and the
--   reconciler know from the row alone whether its units count: a payment refunded
--   after its hold lapsed gave its unit back; a paid order refunded later did not.
-- told: the last state the buyer was told about (order.payment, order.paid,
--   order.expired...), so each outcome is sent once even when several paths (the
--   order worker, a webhook, the reconciler) reach it.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS released TEXT
    CHECK (released IN ('expired', 'cancelled', 'failed'));
ALTER TABLE orders ADD COLUMN IF NOT EXISTS told TEXT;
UPDATE orders SET released = state
    WHERE released IS NULL AND state IN ('expired', 'cancelled', 'failed');
UPDATE orders SET told = state WHERE told IS NULL AND state <> 'held';
