-- cancel.lua: cancels one task. Run by Store.cancel.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P    the key prefix, ppq:<queue_index>:
-- ARGV[2]  id   the task
-- ARGV[3]  ttl  seconds the cancelled record is kept (at least 1)
--
-- Returns the state the task had, false (nil) if it is unknown. A waiting task (queued,
-- delayed, failed) is cancelled at once, and taken out of its priority's ready list
-- (P..'queue' or P..'queue:p:<n>', ready.lua) or P..'delayed' (or
-- out of P..'queue:m:<module>', where a lease moved it aside). A running one gets its
-- cancel flag: its worker learns at its next heartbeat, and the task ends cancelled when
-- it is reported or its lease expires. A task that already ended is left as it is. A waiting
-- task held back by its function's limits is taken out of P..'queue:f:<func>' (limits.lua).
-- A workflow's node (field 'kind': chain, group, chord) pending or running ends cancelled
-- with what of it has not ended (workflow.lua's wf_cancel: running steps get their cancel
-- flag). A node or a task of a workflow, cancelled, fails the node it is part of
-- (wf_failed), so the workflow ends rather than waits for it; the steps that starts (a chord
-- run with on_error 'run') are counted in a P..'wake' publish.

-- include: now.lua
-- include: module.lua
local P, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- include: ready.lua
-- include: workflow.lua
local tk = P .. 't:' .. id
local f = redis.call('HMGET', tk, 'state', 'key', 'body', 'priority', 'kind', 'wf', 'pos', 'parent')
local state = f[1]
if not state then return false end
local up, pos = f[6] or f[8], f[7]
if up or f[5] or state == 'pending' then use_workflows() end
if f[5] or state == 'pending' then
  wf_cancel(id, true, ttl)
  if up and (state == 'pending' or state == 'running') then wf_failed(up, pos, 'step ' .. id .. ' was cancelled', id) end
elseif state == 'queued' or state == 'delayed' or state == 'failed' then
  -- A ready task is in its priority's ready list, or in its module's list if a lease moved it aside.
  local mod = state ~= 'delayed' and redis.call('LREM', ready_list(f[4]), 1, id) == 0 and module_of(f[3])
  if mod then
    local side = P .. 'queue:m:' .. mod
    if redis.call('LREM', side, 1, id) > 0 then
      redis.call('HINCRBY', P .. 'stats', 'parked', -1)
      if redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'parked', mod) end
    end
  end
  -- Or in its function's list, where its rate or concurrency limit held it (limits.lua).
  local fn = state ~= 'delayed' and target_of(f[3])
  if fn and redis.call('LREM', P .. 'queue:f:' .. fn, 1, id) > 0 then
    redis.call('HINCRBY', P .. 'stats', 'parked', -1)
    if redis.call('EXISTS', P .. 'queue:f:' .. fn) == 0 then redis.call('ZREM', P .. 'throttled', fn) end
  end
  redis.call('ZREM', P .. 'delayed', id)
  if f[2] and f[2] ~= '' and redis.call('HGET', P .. 'keys', f[2]) == id then
    redis.call('HDEL', P .. 'keys', f[2])
  end
  redis.call('HSET', tk, 'state', 'cancelled', 'finished', now)
  redis.call('HINCRBY', P .. 'stats', 'cancelled', 1)
  redis.call('EXPIRE', tk, math.max(ttl, 1))
  if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
  if up then wf_failed(up, pos, 'step ' .. id .. ' was cancelled', id) end
elseif state == 'running' then
  redis.call('HSET', tk, 'cancel', '1')
end
if wf_ready > 0 then redis.call('PUBLISH', P .. 'wake', wf_ready) end
return state
