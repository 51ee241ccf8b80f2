-- The reconciler sets a product's counters from its holds, atomically: remaining =
-- units - units of holds held or paid; units per buyer (held or paid); open holds per
-- buyer (held). Every hold of the product is in KEYS; a hold made since the reconciler
-- listed them moved the buyer counter, and then nothing is written (next round).
-- KEYS[1] {drop:D}:p:<P>   KEYS[2] {drop:D}:p:<P>:units   KEYS[3] {drop:D}:p:<P>:open
-- KEYS[4..] {drop:D}:hold:<H>, every hold of the product
-- ARGV[1] the buyer counter when the holds were listed
-- Returns {'ok'} (nothing to do) | {'fixed', remaining before, remaining now}
--       | {'skip', reason}
local product_key, units_key, open_key = KEYS[1], KEYS[2], KEYS[3]
local buyers = ARGV[1]

-- checks -------------------------------------------------------------------
local p = redis.call('HMGET', product_key, 'units', 'remaining', 'buyers')
if not p[1] then
  return {'skip', 'no product'}
end
if (p[3] or '0') ~= buyers then
  return {'skip', 'a hold was made meanwhile'}
end
local sold, units, open = 0, {}, {}
for i = 4, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'state', 'user_id', 'quantity')
  if h[1] == 'held' or h[1] == 'paid' then
    local q = tonumber(h[3])
    sold = sold + q
    units[h[2]] = (units[h[2]] or 0) + q
    if h[1] == 'held' then
      open[h[2]] = (open[h[2]] or 0) + 1
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
if tonumber(p[2]) == remaining and same(units_key, units) and same(open_key, open) then
  return {'ok'}
end

-- writes -------------------------------------------------------------------
redis.call('HSET', product_key, 'remaining', remaining)
redis.call('DEL', units_key, open_key)
for user, n in pairs(units) do
  redis.call('HSET', units_key, user, n)
end
for user, n in pairs(open) do
  redis.call('HSET', open_key, user, n)
end
return {'fixed', tonumber(p[2]), remaining}
