-- One entry into a giveaway: the whole decision in one atomic step. Duplicates are
-- harmless (one field per user); the window is decided by Redis' clock, the same
-- clock the close reads.
-- KEYS[1] {drop:D}:gw:<G>          (the giveaway)
-- KEYS[2] {drop:D}:gw:<G>:in       (its entrants: user id -> display name)
-- ARGV[1] user id   ARGV[2] display name (kept from the first entry)
-- Returns {'ok', added (1 new, 0 already in, also after the close), entries}
--      or {'err', code, detail}: giveaway_not_found, giveaway_closed (detail: closes_at),
--         not_eligible (the drop's creator).
local gw_key, in_key = KEYS[1], KEYS[2]
local user_id, name = ARGV[1], ARGV[2]

-- checks -------------------------------------------------------------------
local g = redis.call('HMGET', gw_key, 'state', 'closes_at', 'creator')
if not g[1] then
  return {'err', 'giveaway_not_found', ''}
end
-- An entrant already in, even after the close: the retry of an entry whose answer
-- was lost (a 503 while no replica confirmed it) says what the draw will have.
if redis.call('HEXISTS', in_key, user_id) == 1 then
  return {'ok', 0, tonumber(redis.call('HGET', gw_key, 'entries'))}
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
redis.call('HSET', in_key, user_id, name)
local entries = redis.call('HINCRBY', gw_key, 'entries', 1)
if entries == 1 then
  redis.call('PEXPIREAT', in_key, redis.call('PEXPIRETIME', gw_key))
end
return {'ok', 1, entries}
