-- A prize unit for a giveaway's winner: a zero-price hold, already settled ('paid': no
-- payment to wait for), taken from the product's stock like a buy and sent down the
-- order stream like one, so the payments worker records its order (amount 0, no
-- PaymentIntent) and recovery and the reconciler count it like any sold unit.
-- The per-buyer limit is not checked (a prize is not bought) but the unit counts
-- towards it, as every unit the buyer holds does. Idempotent: the hold id is fixed by
-- the giveaway and the rank, and a second call answers the first hold.
-- KEYS[1] {drop:D}:sale     KEYS[2] {drop:D}:p:<P>    KEYS[3] {drop:D}:p:<P>:units
-- KEYS[4] {drop:D}:idem     KEYS[5] {drop:D}:hold:<H> KEYS[6] {drop:D}:orders
-- ARGV[1] user id   ARGV[2] hold id   ARGV[3] idempotency key ("giveaway:<G>:<rank>")
-- ARGV[4] drop id   ARGV[5] product id
-- Returns {'ok', hold_id, buyer_number, remaining, replay (0|1), state}
--      or {'err', code, detail}: not_ready (the drop is not loaded), out_of_stock.
local meta_key, product_key, units_key = KEYS[1], KEYS[2], KEYS[3]
local idem_key, hold_key, orders_key = KEYS[4], KEYS[5], KEYS[6]
local user_id, hold_id, idem = ARGV[1], ARGV[2], ARGV[3]
local drop_id, product_id = ARGV[4], ARGV[5]

-- checks -------------------------------------------------------------------
local h = redis.call('HMGET', hold_key, 'buyer_number', 'state')
if h[1] then
  local left = tonumber(redis.call('HGET', product_key, 'remaining')) or 0
  return {'ok', hold_id, tonumber(h[1]), left, 1, h[2]}
end
if not redis.call('HGET', meta_key, 'loaded') then
  return {'err', 'not_ready', 'drop is not loaded'}
end
local p = redis.call('HMGET', product_key, 'remaining', 'currency', 'state')
if not p[1] then
  return {'err', 'out_of_stock', 'unknown product'}
end
if tonumber(p[1]) < 1 then
  return {'err', 'out_of_stock', p[1]}
end

-- writes -------------------------------------------------------------------
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local remaining = redis.call('HINCRBY', product_key, 'remaining', -1)
local buyer_number = redis.call('HINCRBY', product_key, 'buyers', 1)
redis.call('HINCRBY', units_key, user_id, 1)
redis.call('HSET', hold_key, 'hold_id', hold_id, 'drop_id', drop_id,
  'product_id', product_id, 'user_id', user_id, 'quantity', 1,
  'buyer_number', buyer_number, 'unit_price', 0, 'amount', 0,
  'currency', p[2], 'idempotency_key', idem, 'expires_at', now,
  'created_at', now, 'flow', 'client_confirm', 'state', 'paid',
  'remaining_after', remaining)
redis.call('HSET', idem_key, user_id .. '\n' .. idem, hold_id)
redis.call('XADD', orders_key, '*', 'type', 'reserve', 'hold_id', hold_id,
  'drop_id', drop_id, 'product_id', product_id, 'user_id', user_id,
  'quantity', 1, 'buyer_number', buyer_number, 'unit_price', 0,
  'amount', 0, 'currency', p[2], 'idempotency_key', idem,
  'expires_at', now, 'flow', 'client_confirm', 'created_at', now)
return {'ok', hold_id, buyer_number, remaining, 0, 'paid'}
