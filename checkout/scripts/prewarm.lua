-- Load a drop's products into Redis (go live). Idempotent: never resets stock sold.
-- KEYS[1] {drop:D}:sale     KEYS[2] {drop:D}:products     KEYS[3..] {drop:D}:p:<P>
-- ARGV[1] JSON {"drop_id", "currency", "max_holds", "flow",
--               "products": [{"product_id", "price", "units", "limit", "currency"}]}
--         products[i] belongs to KEYS[2 + i].
-- Returns the number of products created (the rest were updated in place).
local meta_key = KEYS[1]
local products_key = KEYS[2]
local spec = cjson.decode(ARGV[1])

-- checks -------------------------------------------------------------------
if #spec.products ~= #KEYS - 2 then
  return redis.error_reply('ERR prewarm: ' .. #spec.products .. ' products for '
    .. (#KEYS - 2) .. ' keys')
end

-- writes -------------------------------------------------------------------
local created = 0
for i, p in ipairs(spec.products) do
  local key = KEYS[2 + i]
  local old_units = redis.call('HGET', key, 'units')
  if not old_units then
    redis.call('HSET', key, 'product_id', p.product_id, 'price', p.price, 'units', p.units,
      'limit', p.limit, 'currency', p.currency, 'state', 'pending',
      'remaining', p.units, 'buyers', 0)
    created = created + 1
  else
    -- Units changed before or during the drop: move remaining by the difference,
    -- never below zero (what is already held or paid stays sold).
    local remaining = tonumber(redis.call('HGET', key, 'remaining')) + p.units
      - tonumber(old_units)
    if remaining < 0 then remaining = 0 end
    redis.call('HSET', key, 'price', p.price, 'units', p.units, 'limit', p.limit,
      'currency', p.currency, 'remaining', remaining)
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
