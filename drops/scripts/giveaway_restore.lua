-- Put a giveaway back into Redis after Redis lost it (it restarted empty): the window
-- from PostgreSQL and the entrants PostgreSQL journaled, so entries go on and
-- repeats stay repeats. Idempotent; entries taken meanwhile by another process stay.
-- KEYS[1] {drop:D}:gw:<G>          KEYS[2] {drop:D}:gw:<G>:in
-- ARGV[1] opened at   ARGV[2] closes at (unix ms)   ARGV[3] creator's user id
-- ARGV[4] keep the keys for (ms after the close)
-- ARGV[5..] user id, display name, user id, display name, ...
-- Returns the distinct entrants after the restore.
local gw_key, in_key = KEYS[1], KEYS[2]
local opened_at, closes_at = tonumber(ARGV[1]), tonumber(ARGV[2])
local creator, keep = ARGV[3], tonumber(ARGV[4])

-- (no checks: every write below is a no-op on what is already there)

-- writes -------------------------------------------------------------------
if redis.call('EXISTS', gw_key) == 0 then
  redis.call('HSET', gw_key, 'state', 'open', 'opened_at', opened_at,
    'closes_at', closes_at, 'creator', creator, 'entries', 0)
  redis.call('PEXPIREAT', gw_key, closes_at + keep)
end
for i = 5, #ARGV - 1, 2 do
  redis.call('HSETNX', in_key, ARGV[i], ARGV[i + 1])
end
local entries = redis.call('HLEN', in_key)
redis.call('HSET', gw_key, 'entries', entries)
if entries > 0 then
  redis.call('PEXPIREAT', in_key, redis.call('PEXPIRETIME', gw_key))
end
return entries
