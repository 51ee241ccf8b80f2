-- The reconciler sets a product's counters from its holds, atomically: remaining =
-- units - units of holds held or paid; units per buyer (held or paid); open holds per
-- buyer (held); and the same per variant for a product with variants (remaining, units
-- per buyer). Every hold of the product is in KEYS; a hold made since the reconciler
-- listed them moved the buyer counter, and then nothing is written (next round).
-- KEYS[1] {drop:D}:p:<P>   KEYS[2] {drop:D}:p:<P>:units   KEYS[3] {drop:D}:p:<P>:open
-- KEYS[4 .. 3 + 2n] {drop:D}:p:<P>:v:<V>, {drop:D}:p:<P>:v:<V>:units for each variant
-- KEYS[4 + 2n ..] {drop:D}:hold:<H>, every hold of the product
-- ARGV[1] the buyer counter when the holds were listed
-- ARGV[2] n, the number of variants ('' or absent: 0)   ARGV[3 .. 2 + n] their ids
-- Returns {'ok'} (nothing to do) | {'fixed', remaining before, remaining now}
--       | {'skip', reason}
local product_key, units_key, open_key = KEYS[1], KEYS[2], KEYS[3]
local buyers = ARGV[1]
local nvariants = tonumber(ARGV[2] or '0') or 0

-- checks -------------------------------------------------------------------
local p = redis.call('HMGET', product_key, 'units', 'remaining', 'buyers')
if not p[1] then
  return {'skip', 'no product'}
end
if (p[3] or '0') ~= buyers then
  return {'skip', 'a hold was made meanwhile'}
end
local variants = {}   -- variant id -> {key, units key, sold, units per buyer}
for i = 1, nvariants do
  variants[ARGV[2 + i]] = {KEYS[2 + 2 * i], KEYS[3 + 2 * i], 0, {}}
end
local sold, units, open = 0, {}, {}
for i = 4 + 2 * nvariants, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'state', 'user_id', 'quantity', 'variant_id')
  if h[1] == 'held' or h[1] == 'paid' then
    local q = tonumber(h[3])
    sold = sold + q
    units[h[2]] = (units[h[2]] or 0) + q
    if h[1] == 'held' then
      open[h[2]] = (open[h[2]] or 0) + 1
    end
    local v = h[4] and variants[h[4]]
    if v then
      v[3] = v[3] + q
      v[4][h[2]] = (v[4][h[2]] or 0) + q
    end
  end
end
local remaining = tonumber(p[1]) - sold
local function same(key, want)
  local have = redis.call('HGETALL', key)
  local n = 0
  for i = 1, #have, 2 do
    if tostring(want[have[i]]) ~= have[i + 1] then
      return false
    end
    n = n + 1
  end
  for _ in pairs(want) do
    n = n - 1
  end
  return n == 0
end
local function variant_left(v)
  return tonumber(redis.call('HGET', v[1], 'units') or '0') - v[3]
end
local agree = tonumber(p[2]) == remaining and same(units_key, units) and same(open_key, open)
for _, v in pairs(variants) do
  if agree and (tonumber(redis.call('HGET', v[1], 'remaining')) ~= variant_left(v)
      or not same(v[2], v[4])) then
    agree = false
  end
end
if agree then
  return {'ok'}
end

-- writes -------------------------------------------------------------------
local function set(key, want)
  redis.call('DEL', key)
  for user, n in pairs(want) do
    redis.call('HSET', key, user, n)
  end
end
redis.call('HSET', product_key, 'remaining', remaining)
set(units_key, units)
set(open_key, open)
for _, v in pairs(variants) do
  redis.call('HSET', v[1], 'remaining', variant_left(v))
  set(v[2], v[4])
end
return {'fixed', tonumber(p[2]), remaining}
