-- One entry into a giveaway: the whole decision in one atomic step. Duplicates are
-- harmless (one field per user); the window is decided by Redis' clock, the same
-- clock the close reads.
-- KEYS[1] {drop:D}:gw:<G>          (the giveaway)
-- KEYS[2] {drop:D}:gw:<G>:in       (its entrants: user id -> display name)
-- ARGV[1] user id   ARGV[2] display name (kept from the first entry)
-- Returns {'ok', added (1 new, 0 already in), entries}
--      or {'err', code, detail}: giveaway_not_found, giveaway_closed (detail: closes_at),
--         not_eligible (the drop's creator).
local gw_key, in_key = KEYS[1], KEYS[2]
local user_id, name = ARGV[1], ARGV[2]

-- checks -------------------------------------------------------------------
local g = redis.call('HMGET', gw_key, 'state', 'closes_at', 'creator')
if not g[1] then
  return {'err', 'giveaway_not_found', ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if g[1] ~= 'open' or now >= tonumber(g[2]) then
  return {'err', 'giveaway_closed', g[2]}
end
if user_id == g[3] then
  return {'err', 'not_eligible', 'creator'}
end

-- writes -------------------------------------------------------------------
local added = redis.call('HSETNX', in_key, user_id, name)
local entries
if added == 1 then
  entries = redis.call('HINCRBY', gw_key, 'entries', 1)
  if entries == 1 then
    redis.call('PEXPIREAT', in_key, redis.call('PEXPIRETIME', gw_key))
  end
else
  entries = tonumber(redis.call('HGET', gw_key, 'entries'))
end
return {'ok', added, entries}
