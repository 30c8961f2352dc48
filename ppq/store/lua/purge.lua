-- purge.lua: deletes one batch of the tasks waiting in a queue_index: ready ones first
-- (P..'queue', the ready lists of the priorities above 0, P..'queue:p:<n>' for each n in the
-- zset P..'priorities' (a priority leaves it when its list is empty), then the lists P..'queue:m:<module>' of the modules in the zset P..'parked',
-- where a lease moves ready tasks aside for workers allowed to run them), then delayed ones
-- and those waiting out a retry backoff (P..'delayed'). Running and dead tasks are left
-- alone. Run by Store.purge_queue, a batch at a time, so that Redis is never held for long.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  limit  most ids taken off those lists and P..'delayed' in this batch (at most 1000)
--
-- Returns {purged, left}: how many tasks were deleted (their records t:<id> and their
-- de-duplication keys in P..'keys' with them; ids whose task was no longer waiting are only
-- dropped from the list), and how many ids are still in those lists and P..'delayed'. A
-- module whose list is empty leaves P..'parked'; stats 'parked' (the ids in those lists) is
-- kept to what is left. The lists P..'queue:f:<func>' of tasks held back by their
-- function's limits (limits.lua, the functions in P..'throttled') are emptied after the
-- modules' lists, and counted in stats 'parked' too.
-- Counts them in stats 'purged'; publishes P..'finished' for each one someone waits on
-- (P..'waiting'), so that its wait ends. A purged step of a workflow (field 'wf') fails its
-- workflow (workflow.lua's wf_failed), which then ends rather than waits for it; the steps
-- that starts (a chord run with on_error 'run') are counted in a P..'wake' publish.

-- include: now.lua
local P, limit = ARGV[1], tonumber(ARGV[2])
-- include: ready.lua
-- include: workflow.lua
local purged, taken = 0, 0
local watched = redis.call('EXISTS', P .. 'waiting') == 1
local function drop(ids)
  for _, id in ipairs(ids) do
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'key', 'wf', 'pos')
    if f[1] == 'queued' or f[1] == 'delayed' or f[1] == 'failed' then
      if f[2] and f[2] ~= '' and redis.call('HGET', P .. 'keys', f[2]) == id then
        redis.call('HDEL', P .. 'keys', f[2])
      end
      redis.call('DEL', tk)
      purged = purged + 1
      if watched and redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
      if f[3] then
        use_workflows()
        wf_failed(f[3], f[4], 'step ' .. id .. ' was purged', id)
      end
    end
  end
  taken = taken + #ids
end
-- Takes up to what is left of the batch off a list; returns how many ids it took.
local function pop(list)
  if taken >= limit then return 0 end
  local ids = redis.call('LPOP', list, limit - taken)
  if not ids then return 0 end
  drop(ids)
  return #ids
end
pop(P .. 'queue')
if taken < limit then
  for _, pri in ipairs(redis.call('ZRANGE', P .. 'priorities', 0, -1)) do
    if taken >= limit then break end
    local list = P .. 'queue:p:' .. pri
    pop(list)
    if redis.call('EXISTS', list) == 0 then redis.call('ZREM', P .. 'priorities', pri) end
  end
end
local aside = 0
if taken < limit then
  for _, mod in ipairs(redis.call('ZRANGE', P .. 'parked', 0, limit - taken - 1)) do
    if taken >= limit then break end
    local side = P .. 'queue:m:' .. mod
    aside = aside + pop(side)
    if redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'parked', mod) end
  end
end
-- The lists of tasks held back by their function's limits (limits.lua), counted in 'parked'.
if taken < limit then
  for _, fn in ipairs(redis.call('ZRANGE', P .. 'throttled', 0, limit - taken - 1)) do
    if taken >= limit then break end
    local side = P .. 'queue:f:' .. fn
    aside = aside + pop(side)
    if redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'throttled', fn) end
  end
end
if aside > 0 then redis.call('HINCRBY', P .. 'stats', 'parked', -aside) end
if taken < limit then
  local ids = redis.call('ZRANGE', P .. 'delayed', 0, limit - taken - 1)
  if #ids > 0 then
    redis.call('ZREM', P .. 'delayed', unpack(ids))
    drop(ids)
  end
end
if purged > 0 then redis.call('HINCRBY', P .. 'stats', 'purged', purged) end
if wf_ready > 0 then redis.call('PUBLISH', P .. 'wake', wf_ready) end
local left = redis.call('LLEN', P .. 'queue') + redis.call('ZCARD', P .. 'delayed')
  + math.max(0, tonumber(redis.call('HGET', P .. 'stats', 'parked')) or 0)
for _, pri in ipairs(redis.call('ZRANGE', P .. 'priorities', 0, -1)) do
  left = left + redis.call('LLEN', P .. 'queue:p:' .. pri)
end
return {purged, left}
