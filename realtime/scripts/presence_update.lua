-- Report this node's viewer count for one drop and return the drop's total.
-- Counts, not rosters: one field per node, "<count>:<expires_ms>". A node that stops
-- reporting (crashed) drops out of the total once its entry expires.
local presence_key = KEYS[1]  -- {drop:<id>}:presence  HASH node -> "count:expires_ms"
local node = ARGV[1]
local count = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])

if count > 0 then
  redis.call("HSET", presence_key, node, count .. ":" .. (now_ms + ttl_ms))
else
  redis.call("HDEL", presence_key, node)
end
local total = 0
local entries = redis.call("HGETALL", presence_key)
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local sep = string.find(value, ":", 1, true)
  local expires = tonumber(string.sub(value, sep + 1))
  if expires < now_ms then
    redis.call("HDEL", presence_key, entries[i])
  else
    total = total + tonumber(string.sub(value, 1, sep - 1))
  end
end
if total > 0 then
  redis.call("PEXPIRE", presence_key, ttl_ms * 2)
end
return total
