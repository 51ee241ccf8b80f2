-- Tell a buyer about their order once: the marker and the private event together, so
-- two paths reaching the same outcome (the order worker, a webhook, a retry after a
-- crash between the publish and PostgreSQL's record of it) publish it once.
-- KEYS[1] {drop:D}:told:<hold id>:<state>   (the marker; expires after ARGV[3] s)
-- ARGV[1] the user's channel   ARGV[2] the message (realtime.publish.user_message)
-- ARGV[3] marker lifetime (s)
-- Returns 1 when published now, 0 when it had been already.
local marker = KEYS[1]
local channel, message, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

-- checks -------------------------------------------------------------------
if redis.call('EXISTS', marker) == 1 then
  return 0
end

-- writes -------------------------------------------------------------------
redis.call('SET', marker, '1', 'EX', ttl)
redis.call('PUBLISH', channel, message)
return 1
