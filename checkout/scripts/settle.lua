-- A held hold is paid (or its payment authorized): it no longer expires and no longer
-- counts as an open hold; its units stay sold and count towards the buyer's limit.
-- Called by the payments worker; idempotent.
-- KEYS[1] {drop:D}:hold:<H>   KEYS[2] {drop:D}:p:<P>:open   KEYS[3] {drop:D}:expiry
-- ARGV[1] hold id   ARGV[2] new state (paid)
-- Returns {'ok', state} | {'noop', state} (already that state) | {'err', state|'not_found'}
local hold_key, open_key, expiry_key = KEYS[1], KEYS[2], KEYS[3]
local hold_id, state = ARGV[1], ARGV[2]

-- checks -------------------------------------------------------------------
local h = redis.call('HMGET', hold_key, 'state', 'user_id')
if not h[1] then
  return {'err', 'not_found'}
end
if h[1] == state then
  return {'noop', state}
end
if h[1] ~= 'held' then
  return {'err', h[1]}
end

-- writes -------------------------------------------------------------------
redis.call('HSET', hold_key, 'state', state)
redis.call('ZREM', expiry_key, hold_id)
if redis.call('HINCRBY', open_key, h[2], -1) <= 0 then
  redis.call('HDEL', open_key, h[2])
end
return {'ok', state}
