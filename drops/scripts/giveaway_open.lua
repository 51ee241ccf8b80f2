-- Open a giveaway in Redis: its entry window, by Redis' clock.
-- KEYS[1] {drop:D}:gw:<G>          (the giveaway)
-- ARGV[1] opened at   ARGV[2] closes at (unix ms, Redis' clock: TIME read by the caller)
-- ARGV[3] creator's user id   ARGV[4] keep the keys for (ms after the close)
-- Returns {opened_at, closes_at} (the first ones again when it exists: idempotent).
local gw_key = KEYS[1]
local opened_at, closes_at = tonumber(ARGV[1]), tonumber(ARGV[2])
local creator, keep = ARGV[3], tonumber(ARGV[4])

-- checks -------------------------------------------------------------------
local g = redis.call('HMGET', gw_key, 'opened_at', 'closes_at')
if g[1] then
  return {tonumber(g[1]), tonumber(g[2])}
end

-- writes -------------------------------------------------------------------
redis.call('HSET', gw_key, 'state', 'open', 'opened_at', opened_at, 'closes_at', closes_at,
  'creator', creator, 'entries', 0)
redis.call('PEXPIREAT', gw_key, closes_at + keep)
return {opened_at, closes_at}
