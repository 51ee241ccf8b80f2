-- Append one durable drop event to the drop's history and fan it out, atomically.
-- Shape after centrifuge's internal/redis_lua/broker_history_add_stream.lua:
-- set the epoch if new, bump the offset, XADD capped, PUBLISH with the position.
-- With a third key the event is also kept in a capped list, newest first (chat's
-- recent messages for the join snapshot): in the same step, so that list is always
-- in offset order and never holds an event the history lacks, or the reverse.
local meta_key = KEYS[1]      -- {drop:<id>}:meta   HASH epoch, offset
local stream_key = KEYS[2]    -- {drop:<id>}:history STREAM, entry id <offset>-0, field d
local recent_key = KEYS[3]    -- optional: {drop:<id>}:chat:recent LIST, newest first
local channel = ARGV[1]       -- {drop:<id>}:events
local body = ARGV[2]          -- msgpack [event, data]
local new_epoch = ARGV[3]     -- used only when the drop has no epoch yet
local max_len = ARGV[4]       -- history size (approximate trim)
local ttl = ARGV[5]           -- seconds the history lives after its last event
local recent_item = ARGV[6]   -- with recent_key: what the list keeps of this event
local recent_len = ARGV[7]    -- with recent_key: how many items the list keeps

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
if recent_key then
  redis.call("LPUSH", recent_key, recent_item)
  redis.call("LTRIM", recent_key, 0, tonumber(recent_len) - 1)
  redis.call("EXPIRE", recent_key, ttl)
end
-- "D<epoch>:<offset>:<body>": parsed by realtime.publish.parse_message.
redis.call("PUBLISH", channel, "D" .. epoch .. ":" .. offset .. ":" .. body)
return {epoch, offset}
