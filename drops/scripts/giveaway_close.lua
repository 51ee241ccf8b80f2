-- Close a giveaway's entry window once it has ended by Redis' clock, and hand back its
-- entrants. After this no entry is taken (giveaway_enter.lua checks the state first).
-- Idempotent: a drawer that died after closing is followed by one that gets the same
-- entrants again.
-- KEYS[1] {drop:D}:gw:<G>          KEYS[2] {drop:D}:gw:<G>:in
-- Returns {'closed', closed_at, user id, name, user id, name, ...} | {'not_yet', ms left}
--       | {'not_found'}
local gw_key, in_key = KEYS[1], KEYS[2]

-- checks -------------------------------------------------------------------
local g = redis.call('HMGET', gw_key, 'state', 'closes_at', 'closed_at')
if not g[1] then
  return {'not_found'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if g[1] == 'open' and now < tonumber(g[2]) then
  return {'not_yet', tonumber(g[2]) - now}
end

-- writes -------------------------------------------------------------------
local closed_at = tonumber(g[3])
if g[1] == 'open' then
  closed_at = now
  redis.call('HSET', gw_key, 'state', 'closed', 'closed_at', now)
end
local out = {'closed', closed_at}
for _, item in ipairs(redis.call('HGETALL', in_key)) do
  out[#out + 1] = item
end
return out
