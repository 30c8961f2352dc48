-- reap.lua: the background sweep of expired leases, run by every master each second.
-- Run by Store.reap.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  maxexp  how many times a task's lease may expire before it goes dead
-- ARGV[3]  limit   most expired leases handled in one call
--
-- Returns {taken, dead}: how many expired leases it took (limit of them: there may be more),
-- and the ids among them that went dead, each followed by its expiries.
-- Each expired task goes back to the front of its priority's ready list (ready.lua), or
-- cancelled (cancel asked), or
-- dead after maxexp expiries. It also drops past entries of P..'waiting' and
-- P..'waiters', rate buckets older than two minutes, and workers that went quiet (with their
-- pause in P..'paused'). A task that held a slot of its function's concurrency limit gives
-- it back (limits.lua). A task of a workflow that ends dead or cancelled fails its workflow
-- (workflow.lua's wf_failed).

-- include: now.lua
local P, maxexp, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- include: ready.lua
-- include: workflow.lua
local ids = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now, 'LIMIT', 0, limit)
local ready = 0
local dead = {}
-- include: limits.lua
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. 'running', id)
  local tk = P .. 't:' .. id
  if redis.call('EXISTS', tk) == 1 then
    local exp = redis.call('HINCRBY', tk, 'expiries', 1)
    local slot = redis.call('HGET', tk, 'slot')
    if slot then
      use_limits()
      ready = ready + free_slot(slot)
      redis.call('HDEL', tk, 'slot')
    end
    redis.call('HINCRBY', P .. 'stats', 'expired', 1)
    local w = redis.call('HMGET', tk, 'cancel', 'wf', 'pos')
    if w[1] == '1' then
      redis.call('HSET', tk, 'state', 'cancelled', 'finished', now)
      if w[2] then
        use_workflows()
        wf_failed(w[2], w[3], 'step ' .. id .. ' was cancelled', id)
      end
    elseif exp > maxexp then
      redis.call('HSET', tk, 'state', 'dead', 'finished', now,
        'error', 'LeaseExpired: the worker running it was lost ' .. exp .. ' times', 'traceback', '')
      redis.call('ZADD', P .. 'dead', now, id)
      redis.call('HINCRBY', P .. 'stats', 'dead', 1)
      if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
      dead[#dead + 1] = id
      dead[#dead + 1] = exp
      if w[2] then
        use_workflows()
        wf_failed(w[2], w[3], 'step ' .. id .. ' failed: LeaseExpired: the worker running it was lost ' .. exp ..
          ' times', id)
      end
    else
      redis.call('HSET', tk, 'state', 'queued', 'eta', now)
      redis.call('HDEL', tk, 'lease')
      requeue(id, redis.call('HGET', tk, 'priority'), true)
      ready = ready + 1
    end
  end
end
ready = ready + wf_ready
if ready > 0 then redis.call('PUBLISH', P .. 'wake', ready) end
redis.call('ZREMRANGEBYSCORE', P .. 'waiting', '-inf', now)
redis.call('ZREMRANGEBYSCORE', P .. 'waiters', '-inf', now)
local oldest = math.floor(now / 10) - 12
for _, field in ipairs(redis.call('HKEYS', P .. 'rate')) do
  if tonumber(string.sub(field, 3)) < oldest then redis.call('HDEL', P .. 'rate', field) end
end
local gone = redis.call('ZRANGEBYSCORE', P .. 'workers:seen', '-inf', now)
for _, wid in ipairs(gone) do
  redis.call('ZREM', P .. 'workers:seen', wid)
  redis.call('HDEL', P .. 'workers', wid)
  redis.call('HDEL', P .. 'paused', 'worker:' .. wid)
end
return {#ids, dead}
