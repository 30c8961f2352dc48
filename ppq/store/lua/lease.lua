-- lease.lua: leases up to `count` ready tasks to worker `wid`, of the modules it may run.
--
-- Fragment: its text replaces a "-- include: lease.lua" line (ppq/store/scripts.py).
-- Expects: P      the key prefix, ppq:<queue_index>:
--          wid    the worker's id
--          count  how many tasks to lease (0: none)
--          lt     lease seconds
--          nonce  random, made by the master for this call
--          allow  the modules the worker may run: '*' any, else their names joined by ','
--                 ('' none); a module is allowed if it or a package it is in (whole dotted
--                 segments) is named. A body module_of cannot read goes to every worker.
--          target_of  from module.lua
--          use_limits, load_limits, room, admit, hold, hold_flush  from limits.lua
--          now    from now.lua
--          module_of  from module.lua
--          expire     from expire.lua
-- Sets:    out    the leased tasks, rows of {id, body, retry, lease, ready since}, in queue
--                 order; each lease is nonce .. ':' .. the row's place in out, so it is
--                 unguessable and distinct per task
--          more   true when the call stopped after moving 1000 ids aside: P..'queue' may
--                 still hold tasks this worker may run
-- Local:   to the block that runs when count > 0 (nothing of it is made otherwise): lim
--          (the limits read this call, false for none), extras (true when P..'paused',
--          P..'limits', P..'priorities' or P..'parked' exists: one EXISTS; when none does
--          the lease is the plain queue's), single, verdicts, expiries, add_running,
--          allows, aside, moved, popped, take.
-- Changes: a waiting task (queued or failed) whose expiry (field 'expires', a unix time) has
--          passed is not leased: expire.lua's expire ends it. Another becomes running in its record t:<id> and in
--          P..'running' (score: lease deadline), its de-duplication key is freed in
--          P..'keys'; stats 'leased' counts them. Ids are taken first off the ready lists of
--          the priorities above 0, P..'queue:p:<n>' for each n in P..'priorities', highest
--          first (read with one ZREVRANGE when something is to be leased; a priority leaves
--          it when its list is found empty), then from the lists of
--          tasks moved aside, P..'queue:m:<module>', of the allowed modules named in
--          P..'parked' (a zset, every score 0: found by name with ZRANGEBYLEX, so a lease
--          never reads the modules it may not run; a module leaves it when its list is
--          found empty), then off the front of P..'queue'. A waiting task of a module the
--          worker may not run is appended to its module's list instead (at most 1000 ids
--          per call), its module added to P..'parked'; there it keeps its place among the
--          tasks moved aside, not its priority. Stats 'parked' is kept to the
--          number of ids in all those lists. Ids of tasks no longer waiting (cancelled,
--          say) are dropped. Nothing is leased while the queue_index (field 'queue' of
--          P..'paused') or the worker (field 'worker:' .. wid) is paused.
--          Limits (limits.lua), read once per call that has something to lease: a task whose
--          function is over its rate or concurrency limit is appended to P..'queue:f:<func>'
--          instead (counted in `moved` and in stats 'parked' like those moved aside by
--          module), its function scored in P..'throttled' by when the next may start; before
--          P..'queue', the lists of the functions whose time has come give as many ids as
--          they may start.

local out = {}
local more = false
-- Nothing to lease (a push with no worker waiting for it): none of what follows is
-- made; Redis pays for every function and table a script creates.
if count > 0 then
  -- What is in use beyond the plain queue (pauses, limits, priorities above 0, modules moved
  -- aside): one EXISTS over their keys, so a queue_index using none of them pays that one
  -- command per call that has something to lease, and nothing per task.
  local extras = redis.call('EXISTS', P .. 'paused', P .. 'limits', P .. 'priorities', P .. 'parked') > 0
  -- Paused: one HMGET.
  if extras then
    local paused = redis.call('HMGET', P .. 'paused', 'queue', 'worker:' .. wid)
    if paused[1] or paused[2] then count = 0 end
  end
  local lim = false
  if extras and count > 0 then
    use_limits()
    lim = load_limits()
  end
  -- Running-set entries of the leased tasks, added in bulk.
  local expiries = {}
  local function add_running()
    if #expiries > 0 then redis.call('ZADD', P .. 'running', unpack(expiries)) end
    expiries = {}
  end
  -- Whether the worker may run a module: worked out once per module per call.
  local verdicts = {}
  -- One name (the usual list): checked in place, without splitting.
  local single = not string.find(allow, ',', 1, true)
  local function allows(mod)
    if allow == '*' or not mod or mod == '' or mod == allow then return true end
    if single then return string.sub(mod, 1, #allow + 1) == allow .. '.' end
    local v = verdicts[mod]
    if v == nil then
      v = false
      for name in string.gmatch(allow, '[^,]+') do
        if mod == name or string.sub(mod, 1, #name + 1) == name .. '.' then
          v = true
          break
        end
      end
      verdicts[mod] = v
    end
    return v
  end
  -- Ids moved aside by this call, by module, appended to their lists at the end; ids taken
  -- off those lists.
  local aside, moved, popped = {}, 0, 0
  local function take(id)
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'key', 'body', 'retry', 'eta', 'created', 'attempts', 'expires')
    if f[1] ~= 'queued' and f[1] ~= 'failed' then return end
    if f[8] and tonumber(f[8]) <= now then
      expire(id, f[2])
      return
    end
    local mod = allow ~= '*' and module_of(f[3])
    if not allows(mod) then
      local ids = aside[mod]
      if not ids then
        ids = {}
        aside[mod] = ids
      end
      ids[#ids + 1] = id
      moved = moved + 1
      return
    end
    if lim then
      local fn = target_of(f[3])
      if fn and lim[fn] and not admit(lim, fn, tk) then
        hold(fn, id)
        moved = moved + 1
        return
      end
    end
    local attempts = (tonumber(f[7]) or 0) + 1
    local lease = nonce .. ':' .. (#out + 1)
    redis.call('HSET', tk, 'state', 'running', 'worker', wid, 'lease', lease, 'started', now, 'attempts', attempts)
    expiries[#expiries + 1] = now + lt
    expiries[#expiries + 1] = id
    if #expiries == 2000 then add_running() end
    if f[2] and f[2] ~= '' and redis.call('HGET', P .. 'keys', f[2]) == id then
      redis.call('HDEL', P .. 'keys', f[2])
    end
    out[#out + 1] = {id, f[3], f[4] or '0', lease, f[5] or f[6] or '0'}
  end
  -- The priorities above 0, highest first, each list FIFO.
  if extras and count > 0 then
    for _, pri in ipairs(redis.call('ZREVRANGE', P .. 'priorities', 0, -1)) do
      local list = P .. 'queue:p:' .. pri
      while #out < count and moved < 1000 do
        local want = math.min(count - #out, 1000 - moved)
        local ids = redis.call('LPOP', list, want)
        if not ids or #ids < want then redis.call('ZREM', P .. 'priorities', pri) end
        if not ids then break end
        for _, id in ipairs(ids) do take(id) end
        if #ids < want then break end
      end
      if #out >= count or moved >= 1000 then break end
    end
  end
  if extras and count > 0 and redis.call('ZCARD', P .. 'parked') > 0 then
    local found = {}
    if allow == '*' then
      found = redis.call('ZRANGE', P .. 'parked', 0, count - 1)
    else
      -- A name and the modules inside it: '.' is the only character of a module name below '/'.
      for name in string.gmatch(allow, '[^,]+') do
        local mods = redis.call('ZRANGEBYLEX', P .. 'parked', '[' .. name, '(' .. name .. '/', 'LIMIT', 0, count)
        for _, mod in ipairs(mods) do found[#found + 1] = mod end
      end
    end
    for _, mod in ipairs(found) do
      if #out >= count or moved >= 1000 then break end
      local side = P .. 'queue:m:' .. mod
      local ids = redis.call('LPOP', side, count - #out)
      if not ids or redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'parked', mod) end
      if ids then
        popped = popped + #ids
        for _, id in ipairs(ids) do take(id) end
      end
    end
  end
  if lim then
    for _, fn in ipairs(redis.call('ZRANGEBYSCORE', P .. 'throttled', '-inf', now, 'LIMIT', 0, count)) do
      if #out >= count or moved >= 1000 then break end
      local side = P .. 'queue:f:' .. fn
      local n, due = room(lim, fn)
      local ids = n >= 1 and redis.call('LPOP', side, math.min(n, count - #out))
      if ids then
        popped = popped + #ids
        for _, id in ipairs(ids) do take(id) end
        n, due = room(lim, fn)
      end
      if redis.call('EXISTS', side) == 0 then redis.call('ZREM', P .. 'throttled', fn)
      else redis.call('ZADD', P .. 'throttled', due, fn) end
    end
  end
  while #out < count and moved < 1000 do
    local ids = redis.call('LPOP', P .. 'queue', math.min(count - #out, 1000 - moved))
    if not ids then break end
    for _, id in ipairs(ids) do take(id) end
  end
  more = moved >= 1000 and #out < count
  if lim then hold_flush(lim) end
  for mod, ids in pairs(aside) do
    for i = 1, #ids, 1000 do redis.call('RPUSH', P .. 'queue:m:' .. mod, unpack(ids, i, math.min(i + 999, #ids))) end
    redis.call('ZADD', P .. 'parked', 0, mod)
  end
  if moved ~= popped then redis.call('HINCRBY', P .. 'stats', 'parked', moved - popped) end
  add_running()
  if #out > 0 then redis.call('HINCRBY', P .. 'stats', 'leased', #out) end
end
