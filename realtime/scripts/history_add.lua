-- Append durable drop events to the drop's history and fan them out, atomically.
-- Shape after centrifuge's internal/redis_lua/broker_history_add_stream.lua:
-- set the epoch if new, bump the offset, XADD capped, PUBLISH with the position.
-- Several events (one creator action: drop.state and drop.buy_now) get consecutive
-- offsets and leave in ONE publication, so every gateway hands them to its viewers
-- as one message.
-- With a third key the (last) event is also kept in a capped list, newest first
-- (chat's recent messages for the join snapshot): in the same step, so that list is
-- always in offset order and never holds an event the history lacks, or the reverse.
local meta_key = KEYS[1]      -- {drop:<id>}:meta   HASH epoch, offset
local stream_key = KEYS[2]    -- {drop:<id>}:history STREAM, entry id <offset>-0, field d
local recent_key = KEYS[3]    -- optional: {drop:<id>}:chat:recent LIST, newest first
local channel = ARGV[1]       -- {drop:<id>}:events
local new_epoch = ARGV[2]     -- used only when the drop has no epoch yet
local max_len = ARGV[3]       -- history size (approximate trim)
local ttl = ARGV[4]           -- seconds the history lives after its last event
local recent_len = ARGV[5]    -- with recent_key: how many items the list keeps
local recent_item = ARGV[6]   -- with recent_key: what the list keeps of the event
-- ARGV[7..]: the events' bodies, msgpack [event, data] each, in order
local FIRST_BODY = 7

local n = #ARGV - FIRST_BODY + 1
local epoch = redis.call("HGET", meta_key, "epoch")
if not epoch then
  -- A new epoch: any stream left behind belongs to the old one.
  epoch = new_epoch
  redis.call("HSET", meta_key, "epoch", epoch)
  redis.call("DEL", stream_key)
end
local last = redis.call("HINCRBY", meta_key, "offset", n)
local first = last - n + 1
local bodies = {}
for i = 1, n do
  bodies[i] = ARGV[FIRST_BODY + i - 1]
  redis.call("XADD", stream_key, "MAXLEN", "~", max_len, (first + i - 1) .. "-0",
             "d", bodies[i])
end
redis.call("EXPIRE", meta_key, ttl)
redis.call("EXPIRE", stream_key, ttl)
if recent_key then
  redis.call("LPUSH", recent_key, recent_item)
  redis.call("LTRIM", recent_key, 0, tonumber(recent_len) - 1)
  redis.call("EXPIRE", recent_key, ttl)
end
-- Parsed by realtime.channels.parse_publications:
-- one event  "D<epoch>:<offset>:<body>"
-- several    "G<epoch>:<first offset>:<msgpack array of the bodies>" (a msgpack array
--            header followed by the bodies is that array)
if n == 1 then
  redis.call("PUBLISH", channel, "D" .. epoch .. ":" .. first .. ":" .. bodies[1])
else
  local head
  if n < 16 then
    head = string.char(0x90 + n)
  else
    head = string.char(0xdc, math.floor(n / 256), n % 256)
  end
  redis.call("PUBLISH", channel, "G" .. epoch .. ":" .. first .. ":" .. head
             .. table.concat(bodies))
end
return {epoch, last}
