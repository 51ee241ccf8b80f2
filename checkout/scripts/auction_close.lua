-- Close an auction that is due, once: by Redis' clock, guarded by its state (every
-- process runs the closer; exactly one call finds it running and due). With a winner
-- at or over the reserve and a unit left, the winner gets a hold on it at the winning
-- price (make_hold: the same hold and order stream entry as a buy). auction.closed
-- goes to every viewer in the same step. Prepended with auction_lib.lua.
-- KEYS[1] {drop:D}:auction:<A>   KEYS[2] {drop:D}:p:<P>   KEYS[3] {drop:D}:p:<P>:units
-- KEYS[4] {drop:D}:p:<P>:open    KEYS[5] {drop:D}:hold:<H> (the winner's, if any)
-- KEYS[6] {drop:D}:expiry        KEYS[7] {drop:D}:orders
-- KEYS[8] {drop:D}:meta          KEYS[9] {drop:D}:history   (realtime's)
-- ARGV[1] hold id  ARGV[2] hold ttl (ms)  ARGV[3] the leader the caller read
-- ARGV[4] the payment flow for that leader  ARGV[5] the drop's channel
-- ARGV[6] a new epoch  ARGV[7] history size  ARGV[8] history ttl (s)
-- Returns {'ok', outcome, winner, amount, hold_id, buyer_number, expires_at, remaining,
--          closed_at, seq, winner_name}
--      or {'noop', state, outcome} (closed already) | {'not_due', ends_at}
--      or {'retry', leader} (the leader changed since the caller read it)
--      or {'err', code}.
local auction_key = KEYS[1]
local k = {product = KEYS[2], units = KEYS[3], open = KEYS[4], hold = KEYS[5],
           expiry = KEYS[6], orders = KEYS[7]}

-- checks -------------------------------------------------------------------
local a = auction_fields(auction_key)
if not a.state then
  return {'err', 'auction_not_found'}
end
if a.state ~= 'running' then
  return {'noop', a.state, a.outcome or ''}
end
local now = now_ms()
if now < tonumber(a.ends_at) then
  return {'not_due', tonumber(a.ends_at)}
end
if a.leader ~= ARGV[3] then
  return {'retry', a.leader}
end
local seq, amount = tonumber(a.seq), tonumber(a.amount)
local outcome = 'sold'
if seq == 0 then
  outcome = 'no_bids'
elseif tonumber(a.reserve) > 0 and amount < tonumber(a.reserve) then
  outcome = 'reserve_not_met'
elseif (tonumber(redis.call('HGET', k.product, 'remaining')) or 0) < 1 then
  outcome = 'no_stock'
end

-- writes -------------------------------------------------------------------
local hold_id, buyer_number, expires_at, remaining = '', 0, 0, -1
if outcome == 'sold' then
  hold_id = ARGV[1]
  buyer_number, expires_at, remaining = make_hold(k, hold_id, a.drop_id, a.product_id,
    a.leader, amount, a.currency, 'auction:' .. a.auction_id, ARGV[4],
    tonumber(ARGV[2]), now, a.auction_id)
end
local winner, winner_name = '', ''
if outcome ~= 'no_bids' then winner, winner_name = a.leader, a.leader_name end
redis.call('HSET', auction_key, 'state', 'closed', 'outcome', outcome, 'closed_at', now,
  'hold_id', hold_id, 'hold_expires_at', expires_at)
local data = {auction_id = tonumber(a.auction_id), product_id = tonumber(a.product_id),
  outcome = outcome, bids = seq, ends_at = tonumber(a.ends_at), closed_at = now,
  server_time = now}
if seq > 0 then
  -- The leading bid, whatever the outcome (reserve not met: the highest bid is shown,
  -- nobody buys).
  data.amount = amount
  data.leader = a.leader_name
  data.leader_id = a.leader
end
local body = cmsgpack.pack({'auction.closed', data})
history_append(KEYS[8], KEYS[9], ARGV[5], ARGV[6], ARGV[7], ARGV[8], body)
return {'ok', outcome, winner, amount, hold_id, buyer_number, expires_at, remaining, now,
  seq, winner_name}
