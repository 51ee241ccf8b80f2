-- Selling on the replay: after the live ended, the creator may put what is left of
-- the products dropped during the live back on sale for the replay page (drops state
-- 'replay', docs/topics/lifecycle.md). 'ended -> replay -> ended'; settlement waits
-- for the replay's sales to close.
ALTER TABLE drops DROP CONSTRAINT IF EXISTS drops_state_check;
ALTER TABLE drops ADD CONSTRAINT drops_state_check
    CHECK (state IN ('draft', 'scheduled', 'live', 'selling', 'sold_out', 'closed',
                     'ended', 'replay', 'settled'));
