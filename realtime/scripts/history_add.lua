-- Append one durable drop event to the drop's history and fan it out, atomically.
-- Shape after centrifuge's internal/redis_lua/broker_history_add_stream.lua:
-- set the epoch if new, bump the offset, XADD capped, PUBLISH with the position.
local meta_key = KEYS[1]      -- {drop:<id>}:meta   HASH epoch, offset
local stream_key = KEYS[2]    -- {drop:<id>}:history STREAM, entry id <offset>-0, field d
local channel = ARGV[1]       -- {drop:<id>}:events
local body = ARGV[2]          -- msgpack [event, data]
local new_epoch = ARGV[3]     -- used only when the drop has no epoch yet
local max_len = ARGV[4]       -- history size (approximate trim)
local ttl = ARGV[5]           -- seconds the history lives after its last event

local epoch = redis.call("HGET", meta_key, "epoch")
if not epoch then
  -- A new epoch: any stream left behind belongs to the old one.
  epoch = new_epoch
  redis.call("HSET", meta_key, "epoch", epoch)
  redis.call("DEL", stream_key)
end
local offset = redis.call("HINCRBY", meta_key, "offset", 1)
redis.call("XADD", stream_key, "MAXLEN", "~", max_len, offset .. "-0", "d", body)
redis.call("EXPIRE", meta_key, ttl)
redis.call("EXPIRE", stream_key, ttl)
-- "D<epoch>:<offset>:<body>": parsed by realtime.publish.parse_message.
redis.call("PUBLISH", channel, "D" .. epoch .. ":" .. offset .. ":" .. body)
return {epoch, offset}
