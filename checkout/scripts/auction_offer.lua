-- A second-chance offer: the winner did not pay within the hold, so the creator offers
-- the unit to the runner-up at that bidder's highest bid, once. The caller picked the
-- runner-up from the bid stream (it no longer changes once the auction is closed).
-- Prepended with auction_lib.lua.
-- KEYS[1] {drop:D}:auction:<A>   KEYS[2] {drop:D}:p:<P>   KEYS[3] {drop:D}:p:<P>:units
-- KEYS[4] {drop:D}:p:<P>:open    KEYS[5] {drop:D}:hold:<H> (the new hold)
-- KEYS[6] {drop:D}:expiry        KEYS[7] {drop:D}:orders
-- KEYS[8] {drop:D}:hold:<W> (the winner's hold)
-- ARGV[1] new hold id  ARGV[2] hold ttl (ms)  ARGV[3] runner-up user id
-- ARGV[4] the runner-up's display name  ARGV[5] their highest bid  ARGV[6] payment flow
-- Returns {'ok', user_id, name, amount, hold_id, buyer_number, expires_at, replay (0|1)}
--      or {'err', code, detail}.
local auction_key = KEYS[1]
local k = {product = KEYS[2], units = KEYS[3], open = KEYS[4], hold = KEYS[5],
           expiry = KEYS[6], orders = KEYS[7]}
local runner, runner_name, amount = ARGV[3], ARGV[4], tonumber(ARGV[5])

-- checks -------------------------------------------------------------------
local a = auction_fields(auction_key)
if not a.state then
  return {'err', 'auction_not_found', ''}
end
if a.state ~= 'closed' or a.outcome ~= 'sold' then
  return {'err', 'not_sold', a.outcome or a.state}
end
if a.offer_hold_id then  -- made already: the same answer again
  return {'ok', a.offer_user, a.offer_name, tonumber(a.offer_amount), a.offer_hold_id,
    tonumber(a.offer_buyer_number), tonumber(a.offer_expires_at), 1}
end
local w = redis.call('HGET', KEYS[8], 'state')
if w == 'held' or w == 'paid' or w == 'authorized' then
  return {'err', 'winner_holds', w}
end
if runner == '' or runner == a.leader then
  return {'err', 'no_runner_up', ''}
end
if (tonumber(redis.call('HGET', k.product, 'remaining')) or 0) < 1 then
  return {'err', 'no_stock', '0'}
end

-- writes -------------------------------------------------------------------
local now = now_ms()
local buyer_number, expires_at = make_hold(k, ARGV[1], a.drop_id, a.product_id, runner,
  amount, a.currency, 'auction-offer:' .. a.auction_id, ARGV[6], tonumber(ARGV[2]), now,
  a.auction_id)
redis.call('HSET', auction_key, 'offer_user', runner, 'offer_name', runner_name,
  'offer_amount', amount, 'offer_hold_id', ARGV[1], 'offer_buyer_number', buyer_number,
  'offer_expires_at', expires_at)
return {'ok', runner, runner_name, amount, ARGV[1], buyer_number, expires_at, 0}
