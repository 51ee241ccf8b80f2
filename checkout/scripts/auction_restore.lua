-- Put back an auction Redis lost (it restarted empty), from PostgreSQL's record: its
-- hash and its accepted bids, once (a no-op when the auction is there). No event: the
-- drop's history went with Redis too, and viewers rejoin from a snapshot.
-- Prepended with auction_lib.lua (unused here; one loader for every auction script).
-- KEYS[1] {drop:D}:auction:<A>   KEYS[2] {drop:D}:auction:<A>:bids
-- ARGV[1] JSON object: the hash's fields   ARGV[2] JSON array of bids, seq order:
--         [seq, user_id, name, amount, at, ends_at, extended (0|1), idempotency key]
-- ARGV[3] keep the keys (ms)
-- Returns {'ok', bids} or {'noop'}.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'noop'}
end
local fields = cjson.decode(ARGV[1])
local flat = {}
for k, v in pairs(fields) do
  flat[#flat + 1] = k
  flat[#flat + 1] = tostring(v)
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('DEL', KEYS[2])
local bids = cjson.decode(ARGV[2])
for _, b in ipairs(bids) do
  redis.call('XADD', KEYS[2], b[1] .. '-1', 'user_id', b[2], 'name', b[3], 'amount', b[4],
    'at', b[5], 'ends_at', b[6], 'extended', b[7], 'idem', b[8])
end
if #bids > 0 then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
end
return {'ok', #bids}
