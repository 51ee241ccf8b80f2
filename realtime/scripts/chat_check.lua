-- May this user post to the drop's chat now? Checks, in order: ban/mute (cached from
-- chat_moderation), the per-user rate limit (fixed window), slow mode. Records the
-- post for the limits only when it is allowed. "unloaded" (nothing recorded): the
-- drop's moderation rows are not in the hash yet (no marker field); the caller reads
-- them from PostgreSQL into it (realtime.chat) and asks again.
local blocked_key = KEYS[1]   -- {drop:<id>}:chat:blocked  HASH user -> "<kind>:<until_ms|0>"
local rate_key = KEYS[2]      -- {drop:<id>}:chat:rate:<user>  counter of this window
local slow_key = KEYS[3]      -- {drop:<id>}:chat:slow  seconds between posts, absent = off
local last_key = KEYS[4]      -- {drop:<id>}:chat:last:<user>  exists while slow mode waits
local user = ARGV[1]
local now_ms = tonumber(ARGV[2])
local rate_limit = tonumber(ARGV[3])
local window_ms = tonumber(ARGV[4])
local exempt = ARGV[5] == "1"  -- the creator and admins skip rate limit and slow mode
local loaded_field = ARGV[6]  -- present in the hash once the drop's rows are in it

if redis.call("HEXISTS", blocked_key, loaded_field) == 0 then
  return {"unloaded", 0}
end
local block = redis.call("HGET", blocked_key, user)
if block then
  local sep = string.find(block, ":", 1, true)
  local kind = string.sub(block, 1, sep - 1)
  local untl = tonumber(string.sub(block, sep + 1))
  if untl == 0 or untl > now_ms then
    return {kind, untl == 0 and -1 or (untl - now_ms)}
  end
  redis.call("HDEL", blocked_key, user)
end
if exempt then
  return {"ok", 0}
end
local slow = tonumber(redis.call("GET", slow_key) or "0")
if slow > 0 then
  local wait = redis.call("PTTL", last_key)
  if wait > 0 then
    return {"slow_mode", wait}
  end
end
local count = redis.call("INCR", rate_key)
if count == 1 then
  redis.call("PEXPIRE", rate_key, window_ms)
end
if count > rate_limit then
  return {"rate_limited", redis.call("PTTL", rate_key)}
end
if slow > 0 then
  redis.call("SET", last_key, "1", "PX", slow * 1000)
end
return {"ok", 0}
