-- What the order pipeline needs to outlive faults.
--
-- orders.released: why the hold's units went back to stock (expired, cancelled,
--   failed), or 'lost' for a hold its process recorded only after Redis had been
--   rebuilt without it; NULL while the units are sold or held. A refunded order keeps
--   it, so recovery and the reconciler know from the row alone whether its units
--   count: a payment refunded after its hold lapsed gave its unit back; a paid order
--   refunded later did not.
-- orders.told: the last state the buyer was told about (order.payment, order.paid,
--   order.expired...), so each outcome is sent once even when several paths (the
--   order worker, a webhook, the reconciler) reach it.
-- drop_rebuilds: when recovery read a drop's orders to rebuild Redis. An order row
--   for a hold made before that read, arriving after it, describes a hold the rebuilt
--   Redis does not count: it is recorded failed (released 'lost'), never counted.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS released TEXT
    CHECK (released IN ('expired', 'cancelled', 'failed', 'lost'));
ALTER TABLE orders ADD COLUMN IF NOT EXISTS told TEXT;
UPDATE orders SET released = state
    WHERE released IS NULL AND state IN ('expired', 'cancelled', 'failed');
UPDATE orders SET told = state WHERE told IS NULL AND state <> 'held';

CREATE TABLE IF NOT EXISTS drop_rebuilds (
    drop_id         BIGINT NOT NULL REFERENCES drops(id) ON DELETE CASCADE,
    read_at_ms      BIGINT NOT NULL,                  -- unix ms of the read
    PRIMARY KEY (drop_id, read_at_ms)
);
