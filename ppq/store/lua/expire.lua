-- expire.lua: ends a waiting task whose expiry has passed before it started.
--
-- Fragment: its text replaces a "-- include: expire.lua" line (ppq/store/scripts.py).
-- Expects: P     the key prefix, ppq:<queue_index>:
--          now   from now.lua
--          dttl  the default result ttl, seconds (a task's own result_ttl wins)
--          use_workflows, wf_failed  from workflow.lua
-- Sets:    expire  a function (id, key): the task t:<id>, already taken off its list by the
--                  caller, becomes 'expired' (finished: now) and is never run; its
--                  de-duplication key (its field 'key') is freed in P..'keys', its record kept
--                  for its result ttl (at least 1 s), stats 'expired_tasks' counts it
--                  (stats 'expired' counts expired leases), and P..'finished' is published
--                  with its id when someone waits on it (P..'waiting'); a task of a
--                  workflow (field 'wf') fails its workflow (wf_failed)

local function expire(id, key)
  local tk = P .. 't:' .. id
  redis.call('HSET', tk, 'state', 'expired', 'finished', now)
  if key and key ~= '' and redis.call('HGET', P .. 'keys', key) == id then redis.call('HDEL', P .. 'keys', key) end
  local g = redis.call('HMGET', tk, 'result_ttl', 'wf', 'pos')
  local ttl = tonumber(g[1]) or dttl
  redis.call('EXPIRE', tk, math.max(math.floor(ttl), 1))
  redis.call('HINCRBY', P .. 'stats', 'expired_tasks', 1)
  if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
  if g[2] then
    use_workflows()
    wf_failed(g[2], g[3], 'step ' .. id .. ' expired before it started', id)
  end
end
