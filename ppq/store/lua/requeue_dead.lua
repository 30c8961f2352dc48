-- requeue_dead.lua: puts dead tasks back at the end of the queue (their priority's ready
-- list, ready.lua), their retries and lease expiries counted from zero again and their
-- expiry (field 'expires') dropped: asked for by hand, they run. Run by Store.requeue_dead.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P  the key prefix, ppq:<queue_index>:
-- ARGV[2]...  the ids to requeue; none: every dead task
--
-- Returns the ids requeued (those that were dead and still have a record).

-- include: now.lua
local P = ARGV[1]
-- include: ready.lua
local ids = {}
if #ARGV == 1 then ids = redis.call('ZRANGE', P .. 'dead', 0, -1) else
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end end
local done = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', P .. 'dead', id) == 1 then
    local tk = P .. 't:' .. id
    if redis.call('EXISTS', tk) == 1 then
      redis.call('HSET', tk, 'state', 'queued', 'retry', 0, 'expiries', 0, 'eta', now)
      redis.call('HDEL', tk, 'expires')
      requeue(id, redis.call('HGET', tk, 'priority'))
      done[#done + 1] = id
    end
  end
end
if #done > 0 then redis.call('PUBLISH', P .. 'wake', #done) end
return done
