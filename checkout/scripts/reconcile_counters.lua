-- The reconciler sets a product's counters to what PostgreSQL says, only if nothing
-- was bought or released since it read them (the drop's order stream has the same
-- length and the product the same buyer counter): a buy or a release in between moves
-- both, so the values would be stale.
-- KEYS[1] {drop:D}:p:<P>   KEYS[2] {drop:D}:p:<P>:units   KEYS[3] {drop:D}:p:<P>:open
-- KEYS[4] {drop:D}:orders
-- ARGV[1] the stream length read   ARGV[2] the buyer counter read
-- ARGV[3] remaining   ARGV[4] JSON {user: units}   ARGV[5] JSON {user: open holds}
-- Returns {'ok'} | {'skip', reason}
local product_key, units_key, open_key, orders_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local length, buyers = tonumber(ARGV[1]), ARGV[2]
local remaining = tonumber(ARGV[3])
local units, open = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])

-- checks -------------------------------------------------------------------
if redis.call('XLEN', orders_key) ~= length then
  return {'skip', 'stream moved'}
end
if (redis.call('HGET', product_key, 'buyers') or '0') ~= buyers then
  return {'skip', 'buyers moved'}
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
return {'ok'}
