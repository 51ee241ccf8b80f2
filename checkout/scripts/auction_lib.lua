-- Shared by the auction scripts (auction_start, bid, auction_close, auction_offer):
-- prepended to each by checkout.auction before it is loaded, so each stays one
-- atomic script. Defines functions only; touches nothing by itself.

-- Redis' clock in unix ms: every auction decision (a bid's time, the end, the close)
-- is taken by this one clock, never a node's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append one durable drop event to the drop's history and publish it, exactly as
-- realtime/scripts/history_add.lua does for one event (same keys, stream id
-- <offset>-0, field d, publication "D<epoch>:<offset>:<body>"), so the event takes
-- its position in the same atomic step as the decision it reports: positions follow
-- the order of the decisions. Returns epoch, offset.
local function history_append(meta_key, stream_key, channel, new_epoch, max_len, ttl, body)
  local epoch = redis.call('HGET', meta_key, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta_key, 'epoch', epoch)
    redis.call('DEL', stream_key)
  end
  local offset = redis.call('HINCRBY', meta_key, 'offset', 1)
  redis.call('XADD', stream_key, 'MAXLEN', '~', max_len, offset .. '-0', 'd', body)
  redis.call('EXPIRE', meta_key, ttl)
  redis.call('EXPIRE', stream_key, ttl)
  redis.call('PUBLISH', channel, 'D' .. epoch .. ':' .. offset .. ':' .. body)
  return epoch, offset
end

-- The minimum increment at a price: increments is "from:step,from:step,..." with
-- ascending "from" (the first is 0); the last band whose "from" <= price applies.
local function step_at(increments, price)
  local step = 1
  for from, s in string.gmatch(increments, '(%d+):(%d+)') do
    if price >= tonumber(from) then step = tonumber(s) end
  end
  return step
end

-- The lowest acceptable next bid: the start price while nobody has bid, then the
-- leading amount plus the increment at that amount.
local function min_next(a)
  local seq = tonumber(a.seq) or 0
  if seq == 0 then return tonumber(a.start) end
  local amount = tonumber(a.amount)
  return amount + step_at(a.increments, amount)
end

-- A sliding-window attempt counter, the same as reserve.lua's bot defence (two fixed
-- buckets, the previous one weighted by how much of it still overlaps; see
-- checkout/defense.py). Returns nil when max <= 0 (off), else
-- {bucket, count, previous, weighted count}.
local function window(key, max, rate_window, now)
  if max <= 0 then return nil end
  local h = redis.call('HMGET', key, 'b', 'c', 'p')
  local bucket = math.floor(now / rate_window)
  local b, c, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if b ~= bucket then
    if b == bucket - 1 then prev = c else prev = 0 end
    c = 0
  end
  local weight = 1 - (now - bucket * rate_window) / rate_window
  return {bucket, c, prev, prev * weight + c}
end

local function count_attempt(key, w, rate_window)
  if w then
    redis.call('HSET', key, 'b', w[1], 'c', w[2] + 1, 'p', w[3])
    redis.call('PEXPIRE', key, 2 * rate_window)
  end
end

-- A hold on one unit for a bidder at a price, exactly as reserve.lua makes one (the
-- same hold hash, expiry entry and type=reserve order stream entry), so the order
-- and payment pipeline cannot tell it from a buy. The caller checked remaining >= 1.
-- k: {product, units, open, hold, expiry, orders}. Returns buyer_number, expires_at,
-- remaining.
local function make_hold(k, hold_id, drop_id, product_id, user_id, price, currency,
                         idem, flow, ttl, now, auction_id)
  local remaining = redis.call('HINCRBY', k.product, 'remaining', -1)
  local buyer_number = redis.call('HINCRBY', k.product, 'buyers', 1)
  redis.call('HINCRBY', k.units, user_id, 1)
  redis.call('HINCRBY', k.open, user_id, 1)
  local expires_at = now + ttl
  redis.call('HSET', k.hold, 'hold_id', hold_id, 'drop_id', drop_id,
    'product_id', product_id, 'user_id', user_id, 'quantity', 1,
    'buyer_number', buyer_number, 'unit_price', price, 'amount', price,
    'currency', currency, 'idempotency_key', idem, 'expires_at', expires_at,
    'created_at', now, 'flow', flow, 'state', 'held', 'remaining_after', remaining,
    'auction_id', auction_id)
  redis.call('ZADD', k.expiry, expires_at, hold_id)
  redis.call('XADD', k.orders, '*', 'type', 'reserve', 'hold_id', hold_id,
    'drop_id', drop_id, 'product_id', product_id, 'user_id', user_id,
    'quantity', 1, 'buyer_number', buyer_number, 'unit_price', price,
    'amount', price, 'currency', currency, 'idempotency_key', idem,
    'expires_at', expires_at, 'flow', flow, 'created_at', now)
  return buyer_number, expires_at, remaining
end

local function auction_fields(key)
  local raw = redis.call('HGETALL', key)
  local a = {}
  for i = 1, #raw, 2 do a[raw[i]] = raw[i + 1] end
  return a
end
