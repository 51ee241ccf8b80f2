-- Start an auction of one unit of a product: its rules, its clock, auction.started.
-- Prepended with auction_lib.lua.
-- KEYS[1] {drop:D}:auction:<A>   KEYS[2] {drop:D}:p:<P>   KEYS[3] {drop:D}:sale
-- KEYS[4] {drop:D}:meta          KEYS[5] {drop:D}:history   (realtime's)
-- ARGV[1] auction id  ARGV[2] drop id  ARGV[3] product id  ARGV[4] currency
-- ARGV[5] start price  ARGV[6] increments "from:step,..."  ARGV[7] reserve (0 = none)
-- ARGV[8] duration (ms)  ARGV[9] anti-snipe window (ms)  ARGV[10] creator id
-- ARGV[11] the drop's channel  ARGV[12] a new epoch  ARGV[13] history size
-- ARGV[14] history ttl (s)  ARGV[15] keep the auction's keys after it ends (ms)
-- Returns {'ok', started_at, ends_at} or {'err', code, detail}.
local auction_key, product_key, sale_key = KEYS[1], KEYS[2], KEYS[3]

-- checks -------------------------------------------------------------------
if redis.call('HEXISTS', sale_key, 'loaded') == 0 then
  return {'err', 'not_ready', 'the drop is not loaded (not live, or being rebuilt)'}
end
local p = redis.call('HMGET', product_key, 'state', 'remaining')
if not p[1] then
  return {'err', 'product_not_loaded', ARGV[3]}
end
if p[1] == 'selling' then
  return {'err', 'product_selling', 'the product is on sale at its fixed price'}
end
if tonumber(p[2]) < 1 then
  return {'err', 'no_stock', '0'}
end
if redis.call('EXISTS', auction_key) == 1 then
  return {'err', 'auction_exists', ARGV[1]}
end

-- writes -------------------------------------------------------------------
local now = now_ms()
local ends_at = now + tonumber(ARGV[8])
redis.call('HSET', auction_key, 'auction_id', ARGV[1], 'drop_id', ARGV[2],
  'product_id', ARGV[3], 'currency', ARGV[4], 'start', ARGV[5], 'increments', ARGV[6],
  'reserve', ARGV[7], 'duration_ms', ARGV[8], 'snipe_ms', ARGV[9], 'creator_id', ARGV[10],
  'state', 'running', 'started_at', now, 'ends_at', ends_at, 'first_ends_at', ends_at,
  'seq', 0, 'amount', 0, 'leader', '', 'leader_name', '')
redis.call('PEXPIRE', auction_key, tonumber(ARGV[15]))
local body = cmsgpack.pack({'auction.started', {
  auction_id = tonumber(ARGV[1]), product_id = tonumber(ARGV[3]), currency = ARGV[4],
  start_price = tonumber(ARGV[5]), increments = ARGV[6], has_reserve = ARGV[7] ~= '0',
  duration_ms = tonumber(ARGV[8]), snipe_window_ms = tonumber(ARGV[9]),
  started_at = now, ends_at = ends_at, next_min = tonumber(ARGV[5]), server_time = now}})
history_append(KEYS[4], KEYS[5], ARGV[11], ARGV[12], ARGV[13], ARGV[14], body)
return {'ok', now, ends_at}
