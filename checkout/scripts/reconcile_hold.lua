-- The reconciler sets one hold to the state PostgreSQL says it is in, moving its units
-- with it, atomically and only if the hold is still as the reconciler saw it.
-- KEYS[1] {drop:D}:hold:<H>   KEYS[2] {drop:D}:p:<P>   KEYS[3] {drop:D}:p:<P>:units
-- KEYS[4] {drop:D}:p:<P>:open KEYS[5] {drop:D}:expiry
-- KEYS[6] {drop:D}:p:<P>:v:<V>  KEYS[7] {drop:D}:p:<P>:v:<V>:units  (a variant's hold:
--         its units move with the product's)
-- ARGV[1] hold id
-- ARGV[2] the state the reconciler saw: 'missing', 'held', 'paid' or 'released'
-- ARGV[3] the target: 'held', 'paid', or a released state (expired, cancelled, failed)
-- ARGV[4] the hold's record as JSON (restoring a missing hold: user_id, quantity,
--         expires_at and the rest, as recovery writes it)
-- ARGV[5] keep a released record (ms)
-- ARGV[6] '1': restore even without stock (the units are paid for: report it)
-- Returns {'ok', remaining} | {'skip', state} (it changed meanwhile)
--       | {'no_stock', remaining} (restoring would oversell)
local hold_key, product_key, units_key, open_key, expiry_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local variant_key, variant_units_key = KEYS[6], KEYS[7]
local hold_id, seen, target = ARGV[1], ARGV[2], ARGV[3]
local record = cjson.decode(ARGV[4])
local keep, force = tonumber(ARGV[5]), ARGV[6] == '1'

local function class(state)
  if not state then return 'missing' end
  if state == 'held' or state == 'paid' then return state end
  return 'released'
end

-- checks -------------------------------------------------------------------
local h = redis.call('HMGET', hold_key, 'state', 'user_id', 'quantity', 'expires_at')
local now_class = class(h[1])
if now_class ~= seen then
  return {'skip', h[1] or 'missing'}
end
local user_id = h[2] or record.user_id
local quantity = tonumber(h[3] or record.quantity)
local expires_at = tonumber(h[4] or record.expires_at)
local counted_before = now_class == 'held' or now_class == 'paid'
local counted_after = target == 'held' or target == 'paid'
local remaining = tonumber(redis.call('HGET', product_key, 'remaining'))
local stock = remaining
if variant_key then
  stock = tonumber(redis.call('HGET', variant_key, 'remaining')) or 0
end
if counted_after and not counted_before and stock < quantity and not force then
  return {'no_stock', stock}
end

-- writes -------------------------------------------------------------------
if now_class == 'missing' then
  for k, v in pairs(record) do
    redis.call('HSET', hold_key, k, tostring(v))
  end
end
redis.call('HSET', hold_key, 'state', target)
if counted_after then
  redis.call('PERSIST', hold_key)
else
  redis.call('PEXPIRE', hold_key, keep)
end
local function move(stock_key, per_user_key, delta)
  local left = redis.call('HINCRBY', stock_key, 'remaining', -delta)
  if redis.call('HINCRBY', per_user_key, user_id, delta) <= 0 then
    redis.call('HDEL', per_user_key, user_id)
  end
  return left
end
if counted_after ~= counted_before then
  local delta = quantity
  if counted_before then delta = -quantity end
  remaining = move(product_key, units_key, delta)
  if variant_key then
    move(variant_key, variant_units_key, delta)
  end
end
if now_class == 'held' and target ~= 'held' then
  if redis.call('HINCRBY', open_key, user_id, -1) <= 0 then
    redis.call('HDEL', open_key, user_id)
  end
  redis.call('ZREM', expiry_key, hold_id)
elseif now_class ~= 'held' and target == 'held' then
  redis.call('HINCRBY', open_key, user_id, 1)
  redis.call('ZADD', expiry_key, expires_at, hold_id)
end
return {'ok', remaining}
