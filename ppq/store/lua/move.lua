-- move.lua: moves delayed tasks, and failed ones waiting out their retry backoff, whose
-- time has come to the end of the queue. Run by Store.move_due.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  limit  most tasks moved in one call
--
-- Returns {moved, next, now}: how many were moved, the next eta in P..'delayed' (a string)
-- or false, and the server's time (a string).

-- include: now.lua
local P, limit = ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, limit)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. 'delayed', id)
  local tk = P .. 't:' .. id
  local state = redis.call('HGET', tk, 'state')
  if state == 'delayed' or state == 'failed' then
    if state == 'delayed' then redis.call('HSET', tk, 'state', 'queued') end
    redis.call('RPUSH', P .. 'queue', id)
    moved = moved + 1
  end
end
if moved > 0 then redis.call('PUBLISH', P .. 'wake', moved) end
local nxt = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false, tostring(now)}
