-- Release a hold: its stock returns, atomically and once. Used by the expiry sweeper
-- (every node sweeps; two sweeping the same hold return the stock once), by a buyer
-- cancelling their own hold and by the payments worker when a payment fails.
-- KEYS[1] {drop:D}:hold:<H>   KEYS[2] {drop:D}:p:<P>   KEYS[3] {drop:D}:p:<P>:units
-- KEYS[4] {drop:D}:p:<P>:open KEYS[5] {drop:D}:expiry  KEYS[6] {drop:D}:orders
-- KEYS[7] {drop:D}:p:<P>:v:<V>  KEYS[8] {drop:D}:p:<P>:v:<V>:units  (a variant's hold)
-- ARGV[1] hold id   ARGV[2] reason: expired | cancelled | failed
-- ARGV[3] user id that must own the hold ('' = any)   ARGV[4] keep the record (ms)
-- Returns {'ok', remaining, user_id, product_id, quantity}
--      or {'noop', state}            (already released or paid; or 'not_due')
--      or {'err', code}              (not_found, not_owner)
local hold_key, product_key, units_key, open_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expiry_key, orders_key = KEYS[5], KEYS[6]
local variant_key, variant_units_key = KEYS[7], KEYS[8]
local hold_id, reason, owner, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

-- checks -------------------------------------------------------------------
local h = redis.call('HMGET', hold_key, 'state', 'user_id', 'quantity', 'expires_at',
  'drop_id', 'product_id')
if not h[1] then
  return {'err', 'not_found'}
end
if owner ~= '' and h[2] ~= owner then
  return {'err', 'not_owner'}
end
if h[1] ~= 'held' then
  return {'noop', h[1]}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if reason == 'expired' and tonumber(h[4]) > now then
  return {'noop', 'not_due'}
end

-- writes -------------------------------------------------------------------
local user_id, quantity = h[2], tonumber(h[3])
redis.call('HSET', hold_key, 'state', reason, 'released_at', now)
redis.call('PEXPIRE', hold_key, keep)
local remaining = redis.call('HINCRBY', product_key, 'remaining', quantity)
if redis.call('HINCRBY', units_key, user_id, -quantity) <= 0 then
  redis.call('HDEL', units_key, user_id)
end
if redis.call('HINCRBY', open_key, user_id, -1) <= 0 then
  redis.call('HDEL', open_key, user_id)
end
if variant_key then
  redis.call('HINCRBY', variant_key, 'remaining', quantity)
  if redis.call('HINCRBY', variant_units_key, user_id, -quantity) <= 0 then
    redis.call('HDEL', variant_units_key, user_id)
  end
end
redis.call('ZREM', expiry_key, hold_id)
redis.call('XADD', orders_key, '*', 'type', 'release', 'hold_id', hold_id,
  'drop_id', h[5], 'product_id', h[6], 'user_id', user_id, 'quantity', quantity,
  'reason', reason)
return {'ok', remaining, user_id, h[6], quantity}
