-- BUY NOW: mark one product selling. Keeps the first opened_at (velocity window).
-- KEYS[1] {drop:D}:sale     KEYS[2] {drop:D}:p:<P>
-- Returns remaining stock, or an error reply "NOT_PREWARMED" / "NOT_READY".
local meta_key = KEYS[1]
local product_key = KEYS[2]

-- checks -------------------------------------------------------------------
if redis.call('EXISTS', product_key) == 0 then
  return redis.error_reply('NOT_PREWARMED product is not loaded; call prewarm first')
end
if redis.call('HEXISTS', meta_key, 'loaded') == 0 then
  return redis.error_reply('NOT_READY drop is being rebuilt from PostgreSQL')
end

-- writes -------------------------------------------------------------------
if redis.call('HGET', product_key, 'state') ~= 'selling' then
  local t = redis.call('TIME')
  redis.call('HSET', product_key, 'state', 'selling',
    'opened_at', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return tonumber(redis.call('HGET', product_key, 'remaining'))
