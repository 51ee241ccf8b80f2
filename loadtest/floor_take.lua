-- The rush floor's buy (loadtest/floor.py): take one unit for one buyer if any is left.
-- What a team on bare websockets + Redis writes at the least: a decrement that never
-- goes below zero, and the buyer recorded (a retry gets its first answer back).
--
-- KEYS[1] stock: units left (an integer)
-- KEYS[2] buyers: hash, buyer -> buyer number
-- ARGV[1] buyer: the buy's idempotency key
-- Returns {buyer number, units left}; buyer number 0: none was left.
local stock_key = KEYS[1]
local buyers_key = KEYS[2]
local buyer = ARGV[1]

local already = redis.call('HGET', buyers_key, buyer)
if already then
  return {tonumber(already), tonumber(redis.call('GET', stock_key) or '0')}
end
local left = tonumber(redis.call('GET', stock_key) or '0')
if left <= 0 then
  return {0, 0}
end
left = redis.call('DECR', stock_key)
local number = redis.call('HLEN', buyers_key) + 1
redis.call('HSET', buyers_key, buyer, number)
return {number, left}
