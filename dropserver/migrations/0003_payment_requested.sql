-- orders.payment_requested: the order worker asked the gateway for this order's
--   PaymentIntent (set before the request, so before PostgreSQL has a payments row).
--   An order without a payments row and without this flag was never charged; one with
--   it may have been (an outage or a crash between the charge and the row), so a
--   retry asks the gateway again with the same idempotency key and undoes the payment
--   if the hold was released meanwhile, instead of taking the order for unpaid.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS payment_requested BOOLEAN NOT NULL DEFAULT false;
UPDATE orders SET payment_requested = true
    WHERE NOT payment_requested AND id IN (SELECT order_id FROM payments);
