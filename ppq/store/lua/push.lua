-- push.lua: stores tasks, or updates a waiting task that has the same key, then leases
-- ready tasks to a waiting worker in the same step. Run by Store.push.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  wid    the worker to lease to, '' for none
-- ARGV[3]  count  how many ready tasks to lease to it
-- ARGV[4]  lt     lease seconds
-- ARGV[5]  seen   seconds until the worker counts as gone
-- ARGV[6]  nonce  random lease nonce ('' when nothing is leased)
-- ARGV[7]  maxw   most workers listed at once
-- ARGV[8]  allow  the modules wid may run, as lease.lua takes them ('*': any)
-- ARGV[9]  dttl   default result ttl, seconds: how long the record of a task found expired
--                 is kept (a task's own result_ttl wins)
-- ARGV[10] me     the pushing master's member in P..'waiters' ('' for none): it wakes its
--                 own long-polls itself, so its registration alone publishes nothing
-- ARGV[11]...     per task, 5 + 2n values: id, key ('' for none), delay (seconds; 0: ready
--                 now), body, n, then n field/value pairs (the options that differ from
--                 their defaults). 'priority' (1-9) puts a ready task on P..'queue:p:<n>'
--                 instead of P..'queue' (ready.lua); 'expires' is a unix time, or seconds
--                 from now when it is not above 10**9 (stored as the time it names)
--
-- Returns {renamed, leased}:
--   renamed  flat {position, id} pairs (position from 1) for the tasks whose id is not the
--            one given: a waiting task with the same key was updated instead
--   leased   the rows leased to wid, as lease.lua's `out`
-- Publishes on P..'wake' the number of tasks made ready and not leased, while a long-poll
-- is registered in P..'waiters' by another master than `me`.

-- include: now.lua
-- include: module.lua
local P, wid, count, lt, seen, nonce, maxw, allow, dttl, me = ARGV[1], ARGV[2], tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9]), ARGV[10]
-- include: ready.lua
-- include: workflow.lua
-- include: expire.lua
local renamed = {}
local position = 0
-- New ready ids by priority ('0': P..'queue'), appended to their lists in bulk (in push order).
local fresh, nfresh = {}, 0
local function flush()
  for pri, ids in pairs(fresh) do
    redis.call('RPUSH', ready_list(pri), unpack(ids))
    if pri ~= '0' then redis.call('ZADD', P .. 'priorities', tonumber(pri), pri) end
  end
  fresh, nfresh = {}, 0
end
local ready, pushed = 0, 0
local i = 11
while i <= #ARGV do
  local id, key, delay, body, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], tonumber(ARGV[i + 4])
  local first, last = i + 5, i + 4 + 2 * n
  i = last + 1
  local tk = P .. 't:' .. id
  local settled = false
  -- The options as stored: the priority read out, a relative expiry made a time.
  local pri, fields = '0', {}
  for j = first, last, 2 do
    local name, value = ARGV[j], ARGV[j + 1]
    if name == 'priority' then
      pri = value
    elseif name == 'expires' and tonumber(value) <= 1000000000 then
      value = now + tonumber(value)
    end
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  if redis.call('EXISTS', tk) == 1 then
    settled = true
  elseif key ~= '' then
    local old = redis.call('HGET', P .. 'keys', key)
    if old then
      local ok = P .. 't:' .. old
      local of = redis.call('HMGET', ok, 'state', 'body', 'priority')
      local state = of[1]
      if state == 'queued' or state == 'delayed' then
        redis.call('HDEL', ok, 'max_retry', 'retry_delay', 'result_ttl', 'priority', 'expires')
        redis.call('HSET', ok, 'body', body)
        if #fields > 0 then redis.call('HSET', ok, unpack(fields)) end
        local old_list, new_list = ready_list(of[3]), ready_list(pri)
        -- A queued task that a lease moved aside under its module goes back to the front of
        -- the queue when it is delayed or runs another module now.
        local was_aside, mod = false, state == 'queued' and module_of(of[2])
        if mod and (delay > 0 or mod ~= module_of(body)) then
          local side = P .. 'queue:m:' .. mod
          was_aside = redis.call('LREM', side, 1, old) > 0
          if was_aside then
            redis.call('HINCRBY', P .. 'stats', 'parked', -1)
            if redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'parked', mod) end
            if delay == 0 then
              requeue(old, pri, true)
              ready = ready + 1
            end
          end
        end
        if delay > 0 then
          if state == 'queued' and not was_aside then redis.call('LREM', old_list, 1, old) end
          redis.call('ZADD', P .. 'delayed', now + delay, old)
          redis.call('HSET', ok, 'state', 'delayed', 'eta', now + delay)
          -- Held back by its function's limits (limits.lua): out of that list too.
          local fn = state == 'queued' and not was_aside and target_of(of[2])
          if fn and redis.call('LREM', P .. 'queue:f:' .. fn, 1, old) > 0 then
            redis.call('HINCRBY', P .. 'stats', 'parked', -1)
          end
        elseif state == 'delayed' then
          redis.call('ZREM', P .. 'delayed', old)
          flush()
          requeue(old, pri)
          redis.call('HSET', ok, 'state', 'queued', 'eta', now)
          ready = ready + 1
        elseif old_list ~= new_list and not was_aside and redis.call('LREM', old_list, 1, old) > 0 then
          -- Its priority changed: to the end of its new priority's list.
          flush()
          requeue(old, pri)
        end
        id = old
        settled = true
      end
    end
    if not settled then redis.call('HSET', P .. 'keys', key, id) end
  end
  if not settled then
    if delay > 0 then
      redis.call('HSET', tk, 'state', 'delayed', 'created', now, 'eta', now + delay, 'body', body)
      redis.call('ZADD', P .. 'delayed', now + delay, id)
    else
      redis.call('HSET', tk, 'state', 'queued', 'created', now, 'body', body)
      ready = ready + 1
      local ids = fresh[pri]
      if not ids then
        ids = {}
        fresh[pri] = ids
      end
      ids[#ids + 1] = id
      nfresh = nfresh + 1
      if nfresh == 1000 then flush() end
    end
    if key ~= '' then redis.call('HSET', tk, 'key', key) end
    if #fields > 0 then redis.call('HSET', tk, unpack(fields)) end
    pushed = pushed + 1
  end
  position = position + 1
  if id ~= ARGV[first - 5] then
    renamed[#renamed + 1] = position
    renamed[#renamed + 1] = id
  end
end
flush()
if pushed > 0 then redis.call('HINCRBY', P .. 'stats', 'pushed', pushed) end
if wid == '' then count = 0 end
-- include: limits.lua
-- include: lease.lua
-- include: seen.lua

if #out > 0 then mark_seen() end
ready = ready + wf_ready - #out
if ready > 0 then
  local others = redis.call('ZCOUNT', P .. 'waiters', now, '+inf')
  if others > 0 and me ~= '' then
    local mine = redis.call('ZSCORE', P .. 'waiters', me)
    if mine and tonumber(mine) >= now then others = others - 1 end
  end
  if others > 0 then redis.call('PUBLISH', P .. 'wake', ready) end
end
return {renamed, out}
