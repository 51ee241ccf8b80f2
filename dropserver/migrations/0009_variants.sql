-- Variants: a product of a drop sold in several versions (a size, a colour), each with
-- its own stock, an optional per-buyer limit and an optional price (docs/topics/checkout.md,
-- "Variants").
--
-- drop_product_variants: one row per variant of a drop's product. The product's
--   drop_products.units is the sum of its variants' units (the drops API keeps it so);
--   price NULL sells at the product's price; per_buyer_limit NULL leaves only the
--   product's limit (which counts every variant of the product together). The options
--   ({"size": "M", "colour": "red"}) are unique within the product.
-- orders.variant_id: the variant a hold took its unit from; NULL for a product without
--   variants (its one implicit variant), and for every order made before variants.
CREATE TABLE IF NOT EXISTS drop_product_variants (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL,
    product_id      BIGINT NOT NULL,
    position        INT NOT NULL DEFAULT 0,
    title           TEXT NOT NULL DEFAULT '',
    options         JSONB NOT NULL DEFAULT '{}'::jsonb,
    image_url       TEXT NOT NULL DEFAULT '',
    price           BIGINT CHECK (price IS NULL OR price > 0),   -- minor units
    units           INT NOT NULL CHECK (units >= 0),
    per_buyer_limit INT CHECK (per_buyer_limit IS NULL OR per_buyer_limit >= 1),
    FOREIGN KEY (drop_id, product_id) REFERENCES drop_products (drop_id, product_id)
        ON DELETE CASCADE,
    UNIQUE (drop_id, product_id, options)
);
CREATE INDEX IF NOT EXISTS drop_product_variants_product_idx
    ON drop_product_variants (drop_id, product_id, position);

ALTER TABLE orders ADD COLUMN IF NOT EXISTS variant_id BIGINT;
