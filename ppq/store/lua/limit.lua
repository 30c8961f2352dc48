-- limit.lua: sets or removes one rate or concurrency limit of a function. Run by
-- Store.set_limit and Store.remove_limit.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  fn     the function, 'module.func'
-- ARGV[3]  kind   'rate' or 'conc'
-- ARGV[4]  value  a rate 'N/s' | 'N/m' | 'N/h', or a concurrency N (checked by the master);
--                 '' removes the limit
--
-- Returns 1 if the limit changed, 0 if it already was as asked. Field kind .. ':' .. fn of
-- P..'limits' (limits.lua). A change makes fn's held tasks due now (P..'throttled') and
-- publishes P..'wake' when there are any; once fn has no limit left, its held tasks go back
-- to the front of their priority's ready list (ready.lua) in their order. A changed rate
-- starts from a full bucket.

local P, fn, kind, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- include: ready.lua
local field = kind .. ':' .. fn
if (redis.call('HGET', P .. 'limits', field) or '') == value then return 0 end
if value == '' then redis.call('HDEL', P .. 'limits', field) else redis.call('HSET', P .. 'limits', field, value) end
if kind == 'rate' then redis.call('HDEL', P .. 'buckets', fn) end
local side = P .. 'queue:f:' .. fn
local waiting = redis.call('LLEN', side)
if redis.call('HEXISTS', P .. 'limits', 'rate:' .. fn) == 0 and redis.call('HEXISTS', P .. 'limits', 'conc:' .. fn) == 0 then
  while true do
    local ids = redis.call('RPOP', side, 1000)
    if not ids then break end
    for _, id in ipairs(ids) do requeue(id, redis.call('HGET', P .. 't:' .. id, 'priority'), true) end
  end
  redis.call('ZREM', P .. 'throttled', fn)
  if waiting > 0 then redis.call('HINCRBY', P .. 'stats', 'parked', -waiting) end
elseif waiting > 0 then
  redis.call('ZADD', P .. 'throttled', 0, fn)
end
if waiting > 0 then redis.call('PUBLISH', P .. 'wake', waiting) end
return 1
