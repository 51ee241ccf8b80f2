-- Stop selling: every product key given moves to state "closed". Holds already taken
-- stay (they are paid or expire as usual).
-- KEYS[1..] {drop:D}:p:<P>
-- Returns how many products changed state.
local changed = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and redis.call('HGET', key, 'state') ~= 'closed' then
    redis.call('HSET', key, 'state', 'closed')
    changed = changed + 1
  end
end
return changed
