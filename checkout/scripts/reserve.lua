-- Reserve stock for one buyer: the whole BUY NOW decision in one atomic step.
-- Every check comes before the first write (a script has no rollback).
-- KEYS[1]  {drop:D}:sale          KEYS[2]  {drop:D}:p:<P>
-- KEYS[3]  {drop:D}:p:<P>:units   KEYS[4]  {drop:D}:p:<P>:open
-- KEYS[5]  {drop:D}:idem          KEYS[6]  {drop:D}:hold:<H>   (the new hold)
-- KEYS[7]  {drop:D}:expiry        KEYS[8]  {drop:D}:orders
-- KEYS[9]  {drop:D}:rl:u:<user>   KEYS[10] {drop:D}:rl:ip:<ip>
-- KEYS[11] {drop:D}:p:<P>:v:<V>   KEYS[12] {drop:D}:p:<P>:v:<V>:units
--          (a buy of a variant only; a product without variants is its own variant)
-- ARGV[1] user id          ARGV[2] quantity        ARGV[3] idempotency key
-- ARGV[4] new hold id      ARGV[5] hold ttl (ms)   ARGV[6] requested flow ('' = default)
-- ARGV[7] drop id          ARGV[8] product id
-- ARGV[9] rate window (ms) ARGV[10] attempts per user per window (0 = off)
-- ARGV[11] attempts per ip per window (0 = off)
-- ARGV[12] velocity window after BUY NOW (ms, 0 = off)  ARGV[13] attempts in it per user
-- ARGV[14] variant id ('' = none: the product has no variants)
-- Returns {'ok', hold_id, buyer_number, expires_at, amount, currency, remaining,
--          replay (0|1), state, quantity, unit_price, flow, variant remaining (or -1)}
--          (remaining: units left of the product, every variant together)
--      or {'err', code, detail}.
local meta_key, product_key, units_key, open_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local idem_key, hold_key, expiry_key, orders_key = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local rl_user_key, rl_ip_key = KEYS[9], KEYS[10]
local user_id, quantity, idem = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local hold_id, ttl, flow = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local drop_id, product_id = ARGV[7], ARGV[8]
local rate_window, user_max, ip_max = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local velocity_window, velocity_max = tonumber(ARGV[12]), tonumber(ARGV[13])
local variant_id = ARGV[14] or ''
local variant_key, variant_units_key = KEYS[11], KEYS[12]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- checks -------------------------------------------------------------------
-- 1. The drop is loaded (absent after a Redis loss until recovery rebuilt it).
local meta = redis.call('HMGET', meta_key, 'loaded', 'max_holds', 'flow')
if not meta[1] then
  return {'err', 'not_ready', 'drop is not loaded'}
end
local p = redis.call('HMGET', product_key, 'state', 'remaining', 'limit', 'price',
  'currency', 'opened_at', 'variants')
if not p[1] then
  return {'err', 'not_selling', 'unknown product'}
end
-- The variant: named exactly when the product has variants (its hash: remaining,
-- limit (0 = only the product's), price).
local v = nil
if variant_id ~= '' then
  if not p[7] or not variant_key then
    return {'err', 'unknown_variant', 'the product has no variants'}
  end
  v = redis.call('HMGET', variant_key, 'remaining', 'limit', 'price')
  if not v[1] then
    return {'err', 'unknown_variant', variant_id}
  end
elseif p[7] then
  return {'err', 'variant_required', p[7]}
end

-- 2. Idempotency: a retry gets the first answer again (replay 1) and changes nothing:
-- the units left and the state as they were then ('remaining_after' is stored with
-- the hold; a hold rebuilt from PostgreSQL after a Redis loss has none: units left now).
local idem_field = user_id .. '\n' .. idem
local first = redis.call('HGET', idem_key, idem_field)
if first then
  -- The first hold's key: KEYS[6] with the first hold id (same hash tag, same slot).
  local first_key = string.gsub(hold_key, '[^:]+$', first)
  local h = redis.call('HMGET', first_key, 'buyer_number', 'expires_at', 'amount', 'currency',
    'remaining_after', 'quantity', 'unit_price', 'flow', 'product_id', 'variant_id',
    'variant_remaining_after')
  if not h[1] then
    return {'err', 'idempotency_key_expired', first}
  end
  if h[9] ~= product_id or tonumber(h[6]) ~= quantity or (h[10] or '') ~= variant_id then
    return {'err', 'idempotency_mismatch', first}
  end
  return {'ok', first, tonumber(h[1]), tonumber(h[2]), tonumber(h[3]), h[4],
    tonumber(h[5] or p[2]), 1, 'held', tonumber(h[6]), tonumber(h[7]), h[8],
    tonumber(h[11] or (v and v[1]) or -1)}
end

-- 3. Bot defence: sliding-window attempt limits per user and per address
-- (two fixed buckets, the previous one weighted by how much of it still overlaps).
local function window(key, max)
  if max <= 0 then return nil end
  local h = redis.call('HMGET', key, 'b', 'c', 'p')
  local bucket = math.floor(now / rate_window)
  local b, c, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if b ~= bucket then
    if b == bucket - 1 then prev = c else prev = 0 end
    c = 0
  end
  local weight = 1 - (now - bucket * rate_window) / rate_window
  return {bucket, c, prev, prev * weight + c}
end
local refusal, detail = nil, nil
local wu = window(rl_user_key, user_max)
local wi = window(rl_ip_key, ip_max)
if wu and wu[4] + 1 > user_max then
  refusal, detail = 'rate_limited', 'user'
elseif wi and wi[4] + 1 > ip_max then
  refusal, detail = 'rate_limited', 'ip'
end
-- Velocity: right after BUY NOW a human taps a few times at most.
local opened_at = tonumber(p[6])
local in_velocity = velocity_window > 0 and opened_at and now - opened_at < velocity_window
local velocity_count = 0
if in_velocity then
  local v = redis.call('HMGET', rl_user_key, 'vo', 'v')
  if tonumber(v[1]) == opened_at then velocity_count = tonumber(v[2]) or 0 end
  if not refusal and velocity_count + 1 > velocity_max then
    refusal, detail = 'velocity_exceeded', tostring(velocity_max)
  end
end

-- 4. Selling, per-buyer limits (the product's over every variant, the variant's own),
-- open holds, stock (of the variant when one is named).
local remaining = tonumber(p[2])
local stock = remaining
if v then stock = tonumber(v[1]) end
if not refusal then
  local held = tonumber(redis.call('HGET', units_key, user_id)) or 0
  local open = tonumber(redis.call('HGET', open_key, user_id)) or 0
  local v_limit = v and tonumber(v[2]) or 0
  if p[1] ~= 'selling' then
    refusal, detail = 'not_selling', p[1]
  elseif held + quantity > tonumber(p[3]) then
    refusal, detail = 'limit_reached', p[3]
  elseif v_limit > 0 and (tonumber(redis.call('HGET', variant_units_key, user_id)) or 0)
      + quantity > v_limit then
    refusal, detail = 'limit_reached', v[2]
  elseif open >= (tonumber(meta[2]) or 1) then
    refusal, detail = 'hold_exists', tostring(open)
  elseif stock < quantity then
    if stock == 0 then refusal = 'sold_out' else refusal = 'not_enough_stock' end
    detail = tostring(stock)
  end
end

-- writes -------------------------------------------------------------------
-- Every attempt counts towards the limits, refused ones too.
if wu then
  redis.call('HSET', rl_user_key, 'b', wu[1], 'c', wu[2] + 1, 'p', wu[3])
end
if wi then
  redis.call('HSET', rl_ip_key, 'b', wi[1], 'c', wi[2] + 1, 'p', wi[3])
  redis.call('PEXPIRE', rl_ip_key, 2 * rate_window)
end
if in_velocity then
  redis.call('HSET', rl_user_key, 'vo', opened_at, 'v', velocity_count + 1)
end
if wu or in_velocity then
  redis.call('PEXPIRE', rl_user_key, math.max(2 * rate_window, velocity_window))
end
if refusal then
  return {'err', refusal, detail}
end

remaining = redis.call('HINCRBY', product_key, 'remaining', -quantity)
local buyer_number = redis.call('HINCRBY', product_key, 'buyers', 1)
redis.call('HINCRBY', units_key, user_id, quantity)
redis.call('HINCRBY', open_key, user_id, 1)
local price = tonumber(p[4])
local variant_remaining = -1
if v then
  variant_remaining = redis.call('HINCRBY', variant_key, 'remaining', -quantity)
  redis.call('HINCRBY', variant_units_key, user_id, quantity)
  price = tonumber(v[3]) or price
end
local amount = price * quantity
local expires_at = now + ttl
if meta[3] == 'manual_capture' or flow == '' then flow = meta[3] or 'client_confirm' end
-- A variant's hold and stream entry name it (trailing fields; none without variants).
local hold_extra, entry_extra = {}, {}
if v then
  hold_extra = {'variant_id', variant_id, 'variant_remaining_after', variant_remaining}
  entry_extra = {'variant_id', variant_id}
end
redis.call('HSET', hold_key, 'hold_id', hold_id, 'drop_id', drop_id,
  'product_id', product_id, 'user_id', user_id, 'quantity', quantity,
  'buyer_number', buyer_number, 'unit_price', price, 'amount', amount,
  'currency', p[5], 'idempotency_key', idem, 'expires_at', expires_at,
  'created_at', now, 'flow', flow, 'state', 'held', 'remaining_after', remaining,
  unpack(hold_extra))
redis.call('HSET', idem_key, idem_field, hold_id)
redis.call('ZADD', expiry_key, expires_at, hold_id)
redis.call('XADD', orders_key, '*', 'type', 'reserve', 'hold_id', hold_id,
  'drop_id', drop_id, 'product_id', product_id, 'user_id', user_id,
  'quantity', quantity, 'buyer_number', buyer_number, 'unit_price', price,
  'amount', amount, 'currency', p[5], 'idempotency_key', idem,
  'expires_at', expires_at, 'flow', flow, 'created_at', now, unpack(entry_extra))
return {'ok', hold_id, buyer_number, expires_at, amount, p[5], remaining, 0, 'held',
  quantity, price, flow, variant_remaining}
