-- workflow.lua: starts, ends and cancels the nodes of workflows (chains, groups, chords).
--
-- Fragment: its text replaces a "-- include: workflow.lua" line (ppq/store/scripts.py).
-- Expects: P        the key prefix, ppq:<queue_index>:
--          now      from now.lua
--          requeue  from ready.lua
-- Sets:    wf_ready     how many leaves the functions below made ready (to add to a 'wake')
--          use_workflows  use_workflows(): makes the functions below; call it before any of them
--          wf_start     a function (id, carry): starts pending node id; a leaf becomes queued on
--                       its priority's ready list, with carry (msgpack bytes, or nil) put first
--                       among its arguments unless it has no field 'take' (immutable), and
--                       leaves stats 'pending'; a leaf whose parameters would then be more than
--                       its field 'maxp' bytes ends dead instead, unstarted, and fails its
--                       workflow (wf_failed) naming it; a chain or chord starts its first step
--                       with carry, a group every member
--          wf_finished  a function (id, pos, result): child pos (from 1) of running node id ended
--                       with result (msgpack bytes); a chain or chord starts its next step with
--                       it or ends done with it (only from the step running: field 'next'); a
--                       group (running, or pending: it ends when started) keeps it in
--                       t:<id>:res (once per member), counting their bytes (field 'bytes'):
--                       past its field 'maxr' it fails (hard); once every member has ended, it
--                       ends done with their results as one msgpack array (wf_group_done)
--          wf_failed    a function (id, pos, error, from, hard): child pos of running or pending
--                       (not started yet: a step of it cancelled before its turn) node id failed
--                       (from: the id of the leaf that failed); unless hard, a group of a chord
--                       run with on_error 'run' (field 'onerr') takes {error, task_id} as that member's
--                       result; any other node ends dead (fields error, failed_task), what of it
--                       has not started is cancelled (running steps finish, their results are
--                       ignored) and its parent fails in turn
--          wf_leaf_done  a function (id, wf, pos, result): leaf id of node wf reported done; a
--                        result that is not msgpack (a pickle) fails the workflow instead, and
--                        none ('') counts as nil
--          wf_cancel    a function (id, flag, ttl): cancels what of node or leaf id has not
--                       ended: pending (leaving stats 'pending') and waiting leaves end
--                       cancelled (a ready list drops an id it meets no longer queued),
--                       running leaves get their cancel flag when flag is true, nodes end
--                       cancelled; ttl: seconds a leaf's record is kept when it has no
--                       result_ttl of its own
--          wf_group_done  its own helper, as the functions above
-- Local:   inside use_workflows, its own helpers: wf_close, wf_be, wf_array, wf_bin, wf_kids
-- Records: a node t:<id> has kind (chain, group, chord), state (pending, running, done, dead,
-- cancelled), parent and pos (none at the root), n, next (chain, chord: the step running, from
-- 1) or remaining, maxr and bytes (group), ttl, created, started, finished, result, error,
-- failed_task; its
-- children's ids are the list t:<id>:kids. A leaf is a task record with wf and pos (its parent
-- and place), state 'pending' until its turn, and take ("H S E n": its body's first H bytes
-- come before the parameters, body[S:E] are its n args, body[E:] its kwargs) and maxp (the
-- most bytes of parameters a push may carry) unless immutable.
-- A node that ends publishes P..'finished' with its id when someone waits on it.

local wf_ready = 0
-- Nothing of it is made until use_workflows() is called: Redis pays for every function a
-- script creates, and most calls touch no workflow.
local wf_start, wf_finished, wf_failed, wf_cancel, wf_group_done, wf_leaf_done
local function use_workflows()
  if wf_start then return end
  local function wf_be(n, bytes)
    local t = {}
    for i = bytes, 1, -1 do
      t[i] = string.char(n % 256)
      n = math.floor(n / 256)
    end
    return table.concat(t)
  end

  local function wf_array(n)
    if n < 16 then return string.char(0x90 + n) end
    if n < 65536 then return '\220' .. wf_be(n, 2) end
    return '\221' .. wf_be(n, 4)
  end

  local function wf_bin(n)
    if n < 256 then return '\196' .. string.char(n) end
    if n < 65536 then return '\197' .. wf_be(n, 2) end
    return '\198' .. wf_be(n, 4)
  end

  -- Calls fn(kid) for each child of node id, 1000 ids read at a time.
  local function wf_kids(id, n, fn)
    local kids = P .. 't:' .. id .. ':kids'
    for i = 0, n - 1, 1000 do
      for _, kid in ipairs(redis.call('LRANGE', kids, i, i + 999)) do fn(kid) end
    end
  end

  -- Node id ends in state with the fields of `extra`; its record and children's list are kept ttl seconds.
  local function wf_close(id, state, ttl, extra)
    local tk = P .. 't:' .. id
    redis.call('HSET', tk, 'state', state, 'finished', now, unpack(extra))
    ttl = math.max(math.floor(tonumber(ttl) or 86400), 1)
    redis.call('EXPIRE', tk, ttl)
    redis.call('EXPIRE', tk .. ':kids', ttl)
    redis.call('DEL', tk .. ':res')
    if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
  end

  wf_start = function(id, carry)
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'kind', 'take', 'priority', 'n', 'maxp', 'wf', 'pos')
    if f[1] ~= 'pending' then return end
    if not f[2] then
      redis.call('HINCRBY', P .. 'stats', 'pending', -1)
      if carry and f[3] then
        local body = redis.call('HGET', tk, 'body')
        local h, s, e, n = string.match(f[3], '^(%d+) (%d+) (%d+) (%d+)$')
        h, s, e, n = tonumber(h), tonumber(s), tonumber(e), tonumber(n)
        local size = 1 + #wf_array(n + 1) + #carry + (#body - s)
        if f[6] and size > tonumber(f[6]) then
          -- Its arguments and the previous result are more than a push may carry: the step
          -- ends dead without running, and its workflow fails.
          local err = 'step ' .. id .. ' was not started: its arguments with the previous result are ' .. size ..
            ' bytes, more than the limit of ' .. f[6] .. ' (limits.max_payload)'
          redis.call('HSET', tk, 'state', 'dead', 'finished', now, 'error', err)
          redis.call('ZADD', P .. 'dead', now, id)
          redis.call('HINCRBY', P .. 'stats', 'dead', 1)
          if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
          if f[7] then wf_failed(f[7], f[8], err, id) end
          return
        end
        local params = '\146' .. wf_array(n + 1) .. carry .. string.sub(body, s + 1, e) .. string.sub(body, e + 1)
        redis.call('HSET', tk, 'body', string.sub(body, 1, h) .. wf_bin(#params) .. params)
      end
      redis.call('HSET', tk, 'state', 'queued', 'eta', now)
      requeue(id, f[4])
      wf_ready = wf_ready + 1
      return
    end
    redis.call('HSET', tk, 'state', 'running', 'started', now)
    if f[2] == 'group' then
      wf_kids(id, tonumber(f[5]), function(kid) wf_start(kid, carry) end)
      -- Every member ended before it started (cancelled, in a group run with on_error 'run').
      if tonumber(redis.call('HGET', tk, 'remaining')) <= 0 then wf_group_done(id, tonumber(f[5])) end
    else
      redis.call('HSET', tk, 'next', 1)
      wf_start(redis.call('LINDEX', tk .. ':kids', 0), carry)
    end
  end

  -- Group id of n members, every one ended: it ends done with their results as one array.
  wf_group_done = function(id, n)
    local tk = P .. 't:' .. id
    local parts = {wf_array(n)}
    for i = 1, n, 1000 do
      local names = {}
      for j = i, math.min(i + 999, n) do names[#names + 1] = j end
      local values = redis.call('HMGET', tk .. ':res', unpack(names))
      for j = 1, #names do parts[#parts + 1] = values[j] or '\192' end
    end
    local result = table.concat(parts)
    local f = redis.call('HMGET', tk, 'parent', 'pos', 'ttl')
    wf_close(id, 'done', f[3], {'result', result})
    if f[1] then wf_finished(f[1], f[2], result) end
  end

  wf_finished = function(id, pos, result)
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'kind', 'next', 'n', 'parent', 'pos', 'ttl', 'maxr')
    local n = tonumber(f[4])
    if f[2] == 'group' then
      -- A group not started yet takes the error of a member cancelled meanwhile (on_error
      -- 'run'); it ends once started.
      if f[1] ~= 'running' and f[1] ~= 'pending' then return end
      -- Each member counts once.
      if redis.call('HSETNX', tk .. ':res', pos, result) == 0 then return end
      if f[8] and redis.call('HINCRBY', tk, 'bytes', #result) > tonumber(f[8]) then
        wf_failed(id, pos, 'the results of group ' .. id .. ' are more than ' .. f[8] ..
          ' bytes (limits.max_message)', redis.call('LINDEX', tk .. ':kids', pos - 1), true)
        return
      end
      if redis.call('HINCRBY', tk, 'remaining', -1) > 0 or f[1] == 'pending' then return end
      wf_group_done(id, n)
      return
    end
    -- Only the step running moves a chain on.
    if f[1] ~= 'running' or tonumber(pos) ~= tonumber(f[3]) then return end
    local nxt = tonumber(f[3]) + 1
    if nxt <= n then
      redis.call('HSET', tk, 'next', nxt)
      wf_start(redis.call('LINDEX', tk .. ':kids', nxt - 1), result)
      return
    end
    wf_close(id, 'done', f[7], {'result', result})
    if f[5] then wf_finished(f[5], f[6], result) end
  end

  wf_failed = function(id, pos, err, from, hard)
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'onerr', 'parent', 'pos', 'ttl', 'n')
    -- A node not started yet fails too (a step of it cancelled before its turn).
    if f[1] ~= 'running' and f[1] ~= 'pending' then return end
    if f[2] == 'run' and not hard then
      wf_finished(id, pos, cmsgpack.pack({error = err, task_id = from}))
      return
    end
    wf_close(id, 'dead', f[5], {'error', err, 'failed_task', from})
    wf_kids(id, tonumber(f[6]), function(kid) wf_cancel(kid, false, f[5]) end)
    if f[3] then wf_failed(f[3], f[4], err, from) end
  end

  wf_cancel = function(id, flag, ttl)
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'kind', 'ttl', 'n', 'result_ttl')
    local state = f[1]
    if f[2] then
      if state == 'pending' or state == 'running' then
        wf_close(id, 'cancelled', f[3], {})
        wf_kids(id, tonumber(f[4]), function(kid) wf_cancel(kid, flag, f[3]) end)
      end
    elseif state == 'pending' or state == 'queued' or state == 'failed' or state == 'delayed' then
      if state == 'pending' then redis.call('HINCRBY', P .. 'stats', 'pending', -1) end
      redis.call('HSET', tk, 'state', 'cancelled', 'finished', now)
      redis.call('ZREM', P .. 'delayed', id)
      redis.call('HINCRBY', P .. 'stats', 'cancelled', 1)
      redis.call('EXPIRE', tk, math.max(math.floor(tonumber(f[5]) or tonumber(ttl) or 86400), 1))
      if redis.call('ZSCORE', P .. 'waiting', id) then redis.call('PUBLISH', P .. 'finished', id) end
    elseif state == 'running' and flag then
      redis.call('HSET', tk, 'cancel', '1')
    end
  end

  wf_leaf_done = function(id, wf, pos, result)
    if result == '' then result = '\192' end
    if #result > 1 and string.byte(result, 1) == 0x80 then
      wf_failed(wf, pos, 'step ' .. id .. ' returned a value that is not msgpack; workflows pass msgpack results only',
        id)
    else
      wf_finished(wf, pos, result)
    end
  end
end
