-- move.lua: moves delayed tasks, and failed ones waiting out their retry backoff, whose
-- time has come to the end of the queue. Run by Store.move_due.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  limit  most tasks moved in one call
-- ARGV[3]  dttl   default result ttl, seconds (a task's own result_ttl wins): how long the
--                 record of a task whose expiry passed while it waited is kept
--
-- Returns {moved, next, now}: how many were moved, the next eta in P..'delayed' (a string)
-- or false, and the server's time (a string). Each goes to the end of its priority's ready
-- list (ready.lua); one whose expiry (field 'expires') has passed ends expired instead
-- (expire.lua), counted in neither.

-- include: now.lua
local P, limit, dttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- include: ready.lua
-- include: workflow.lua
-- include: expire.lua
local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, limit)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. 'delayed', id)
  local tk = P .. 't:' .. id
  local f = redis.call('HMGET', tk, 'state', 'priority', 'expires', 'key')
  local state = f[1]
  if (state == 'delayed' or state == 'failed') and f[3] and tonumber(f[3]) <= now then
    expire(id, f[4])
  elseif state == 'delayed' or state == 'failed' then
    if state == 'delayed' then redis.call('HSET', tk, 'state', 'queued') end
    requeue(id, f[2])
    moved = moved + 1
  end
end
if moved + wf_ready > 0 then redis.call('PUBLISH', P .. 'wake', moved + wf_ready) end
local nxt = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false, tostring(now)}
