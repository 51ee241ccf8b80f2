-- Load a drop's products into Redis (go live). Idempotent: never resets stock sold.
-- KEYS[1] {drop:D}:sale     KEYS[2] {drop:D}:products     KEYS[3..] {drop:D}:p:<P>
--         then {drop:D}:p:<P>:v:<V>, every variant of every product in order
-- ARGV[1] JSON {"drop_id", "currency", "max_holds", "flow",
--               "products": [{"product_id", "price", "units", "limit", "currency",
--                             "variants"?: [{"variant_id", "price", "units", "limit"}]}]}
--         products[i] belongs to KEYS[2 + i]; a product's units are its variants'
--         together, and its remaining the sum of theirs.
-- Returns the number of products created (the rest were updated in place).
local meta_key = KEYS[1]
local products_key = KEYS[2]
local spec = cjson.decode(ARGV[1])

-- checks -------------------------------------------------------------------
local nvariants = 0
for _, p in ipairs(spec.products) do
  if type(p.variants) == 'table' then nvariants = nvariants + #p.variants end
end
if #spec.products + nvariants ~= #KEYS - 2 then
  return redis.error_reply('ERR prewarm: ' .. #spec.products .. ' products and '
    .. nvariants .. ' variants for ' .. (#KEYS - 2) .. ' keys')
end

-- Create a stock hash, or move its remaining by a change of units, never below zero
-- (what is already held or paid stays sold). Returns its remaining.
local function stock(key, fields, units)
  local old_units = redis.call('HGET', key, 'units')
  if not old_units then
    redis.call('HSET', key, 'units', units, 'remaining', units, unpack(fields))
    return units, true
  end
  local remaining = tonumber(redis.call('HGET', key, 'remaining')) + units
    - tonumber(old_units)
  if remaining < 0 then remaining = 0 end
  redis.call('HSET', key, 'units', units, 'remaining', remaining, unpack(fields))
  return remaining, false
end

-- writes -------------------------------------------------------------------
local created = 0
local next_key = 3 + #spec.products
for i, p in ipairs(spec.products) do
  local key = KEYS[2 + i]
  local fields = {'price', p.price, 'limit', p.limit, 'currency', p.currency}
  if redis.call('EXISTS', key) == 0 then
    fields[#fields + 1] = 'product_id'
    fields[#fields + 1] = p.product_id
    fields[#fields + 1] = 'state'
    fields[#fields + 1] = 'pending'
    fields[#fields + 1] = 'buyers'
    fields[#fields + 1] = 0
  end
  local _, new = stock(key, fields, p.units)
  if new then created = created + 1 end
  if type(p.variants) == 'table' and #p.variants > 0 then
    local ids, left = {}, 0
    for _, v in ipairs(p.variants) do
      local remaining = stock(KEYS[next_key], {'price', v.price, 'limit', v.limit}, v.units)
      next_key = next_key + 1
      left = left + remaining
      ids[#ids + 1] = tostring(v.variant_id)
    end
    redis.call('HSET', key, 'variants', table.concat(ids, ','), 'remaining', left)
  else
    redis.call('HDEL', key, 'variants')
  end
  redis.call('SADD', products_key, p.product_id)
end
redis.call('HSET', meta_key, 'drop_id', spec.drop_id, 'currency', spec.currency,
  'max_holds', spec.max_holds, 'flow', spec.flow)
if redis.call('HEXISTS', meta_key, 'loaded') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', meta_key, 'loaded', 1,
    'generation', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return created
