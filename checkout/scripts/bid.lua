-- A bid: the whole decision in one atomic step, and its event for every viewer.
-- Every check comes before the first write (a script has no rollback).
-- Prepended with auction_lib.lua (now_ms, history_append, min_next, window).
-- KEYS[1] {drop:D}:auction:<A>        KEYS[2] {drop:D}:auction:<A>:bids  (STREAM)
-- KEYS[3] {drop:D}:auction:<A>:idem   KEYS[4] {drop:D}:rl:bid:u:<user>
-- KEYS[5] {drop:D}:rl:bid:ip:<ip>     KEYS[6] {drop:D}:chat:blocked  (bans)
-- KEYS[7] {drop:D}:meta               KEYS[8] {drop:D}:history   (realtime's)
-- ARGV[1] user id     ARGV[2] amount (minor units)   ARGV[3] idempotency key
-- ARGV[4] the bidder's display name
-- ARGV[5] rate window (ms)  ARGV[6] attempts per user per window (0 = off)
-- ARGV[7] attempts per ip per window (0 = off)
-- ARGV[8] the drop's channel  ARGV[9] a new epoch  ARGV[10] history size
-- ARGV[11] history ttl (s)  ARGV[12] keep the bid stream and answers (ms)
-- Returns {'ok', seq, amount, ends_at, at, extended (0|1), outbid user ('' = none),
--          replay (0|1), next_min, outbid amount}
--      or {'err', code, detail, next_min, ends_at, now}.
local auction_key, bids_key, idem_key = KEYS[1], KEYS[2], KEYS[3]
local rl_user_key, rl_ip_key, blocked_key = KEYS[4], KEYS[5], KEYS[6]
local meta_key, history_key = KEYS[7], KEYS[8]
local user_id, amount, idem, name = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local rate_window, user_max, ip_max = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local now = now_ms()

-- checks -------------------------------------------------------------------
-- 1. The auction exists here.
local f = redis.call('HMGET', auction_key, 'state', 'seq', 'amount', 'start', 'increments',
  'ends_at', 'snipe_ms', 'leader', 'auction_id', 'product_id')
if not f[1] then
  return {'err', 'auction_not_found', '', 0, 0, now}
end
local a = {state = f[1], seq = f[2], amount = f[3], start = f[4], increments = f[5]}
local ends_at, snipe_ms, leader = tonumber(f[6]), tonumber(f[7]), f[8]
local seq = tonumber(a.seq)
local need = min_next(a)

-- 2. Idempotency: a retry gets the first answer again (replay 1), changes nothing.
local idem_field = user_id .. '\n' .. idem
local first = redis.call('HGET', idem_key, idem_field)
if first then
  local s, amt, e, at, ext, prev, prev_amt = string.match(first,
    '^(%d+):(%d+):(%d+):(%d+):(%d):([^\n]*)\n(%d*)$')
  if tonumber(amt) ~= amount then
    return {'err', 'idempotency_mismatch', s, need, ends_at, now}
  end
  return {'ok', tonumber(s), tonumber(amt), tonumber(e), tonumber(at), tonumber(ext), prev,
    1, need, tonumber(prev_amt) or 0}
end

-- 3. Banned from the drop's room (the chat's moderation, cached in this hash).
local block = redis.call('HGET', blocked_key, user_id)
if block then
  local kind, untl = string.match(block, '^(%a+):(%d+)$')
  if kind == 'ban' and (tonumber(untl) == 0 or tonumber(untl) > now) then
    return {'err', 'banned', '', need, ends_at, now}
  end
end

-- 4. Bot defence: attempt limits per user and per address (refused attempts count).
local refusal, detail = nil, ''
local wu = window(rl_user_key, user_max, rate_window, now)
local wi = window(rl_ip_key, ip_max, rate_window, now)
if wu and wu[4] + 1 > user_max then
  refusal, detail = 'rate_limited', 'user'
elseif wi and wi[4] + 1 > ip_max then
  refusal, detail = 'rate_limited', 'ip'
end

-- 5. Open (by Redis' clock: a bid at or after the end is refused even before the
-- closer ran), not already leading, at least the next minimum.
if not refusal then
  if a.state ~= 'running' or now >= ends_at then
    refusal, detail = 'auction_closed', a.state
  elseif leader == user_id then
    refusal = 'already_leading'
  elseif amount < need then
    refusal, detail = 'bid_too_low', tostring(need)
  end
end

-- writes -------------------------------------------------------------------
count_attempt(rl_user_key, wu, rate_window)
count_attempt(rl_ip_key, wi, rate_window)
if refusal then
  return {'err', refusal, detail, need, ends_at, now}
end

seq = seq + 1
-- Anti-snipe: a bid with less than the window left resets the clock to the window.
local extended = 0
if ends_at - now < snipe_ms then
  ends_at = now + snipe_ms
  extended = 1
end
local prev_amount = tonumber(a.amount) or 0
redis.call('HSET', auction_key, 'seq', seq, 'amount', amount, 'leader', user_id,
  'leader_name', name, 'ends_at', ends_at)
redis.call('XADD', bids_key, seq .. '-1', 'user_id', user_id, 'name', name,
  'amount', amount, 'at', now, 'ends_at', ends_at, 'extended', extended, 'idem', idem)
redis.call('HSET', idem_key, idem_field, seq .. ':' .. amount .. ':' .. ends_at .. ':' .. now
  .. ':' .. extended .. ':' .. leader .. '\n' .. prev_amount)
redis.call('PEXPIRE', bids_key, ARGV[12])
redis.call('PEXPIRE', idem_key, ARGV[12])
a.seq, a.amount = seq, amount
local next_min = min_next(a)
local body = cmsgpack.pack({'auction.bid', {
  auction_id = tonumber(f[9]), product_id = tonumber(f[10]), seq = seq, amount = amount,
  bidder = name, bidder_id = user_id, ends_at = ends_at, extended = extended == 1,
  next_min = next_min, server_time = now}})
history_append(meta_key, history_key, ARGV[8], ARGV[9], ARGV[10], ARGV[11], body)
return {'ok', seq, amount, ends_at, now, extended, leader, 0, next_min, prev_amount}
