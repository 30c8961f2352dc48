-- report.lua: records finishes, errors and hand-backs from one worker, then leases it up
-- to `count` tasks in the same step. Run by Store.report.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  wid     the reporting worker
-- ARGV[3]  count   how many tasks to lease to it
-- ARGV[4]  lt      lease seconds
-- ARGV[5]  seen    seconds until the worker counts as gone
-- ARGV[6]  dttl    default result ttl, seconds (a task's own result_ttl wins)
-- ARGV[7]  strict  '1': lease nothing if any report is refused
-- ARGV[8]  nonce   random lease nonce ('' when nothing is leased)
-- ARGV[9]  maxw    most workers listed at once
-- ARGV[10] allow   the modules wid may run, as lease.lua takes them ('*': any)
-- ARGV[11]...      6 values per report: id, lease, kind, result, error, traceback; kind is
--                  'ok', 'error' (retried while retries are left), 'error-final' (never
--                  retried) or 'release' (handed back unrun, to the front of the queue)
--                  A task retried or handed back goes to its priority's ready list (ready.lua).
--
-- Returns {accepted, leased, more, failed}:
--   accepted  1 or 0 per report, in order (0: the lease was lost, nothing changed)
--   leased    the rows leased to wid, as lease.lua's `out`
--   more      1 when lease.lua's `more` is true (P..'queue' may still hold tasks wid may
--             run: ask again at once), else 0
--   failed    4 values per accepted error report (cancelled tasks aside): id, the attempts
--             failed so far (retry), max_retry, and the seconds until its next run (0: queued
--             at once) or -1: dead-listed
-- A task whose cancel flag is set ends cancelled whatever the report says. Publishes
-- P..'finished' with the id of each watched task (P..'waiting') reported on, hand-backs
-- aside, and P..'wake' with the number of tasks made ready (a task that gives back a slot
-- of its function's concurrency limit while others wait for one counts as one).
-- A task of a workflow (field 'wf') that ends done, dead or cancelled moves its workflow on
-- (workflow.lua: wf_leaf_done, wf_failed); the steps that starts count in 'wake'.

-- include: now.lua
-- include: module.lua
local P, wid, count, lt, seen, dttl, nonce, maxw, allow = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[8], tonumber(ARGV[9]), ARGV[10]
-- include: ready.lua
-- include: workflow.lua
-- include: expire.lua
local accepted = {}
local ready = 0
-- include: limits.lua
-- Slots of concurrency limits held by running tasks: looked up one by one only when there are any.
local slotted = redis.call('EXISTS', P .. 'slots') == 1
local bucket = math.floor(now / 10)
local done_n, failed_n = 0, 0
local failed = {}
local refused = false
-- Tasks someone waits on (wait_task): looked up one by one only when there are any.
local watched = redis.call('EXISTS', P .. 'waiting') == 1
for i = 11, #ARGV, 6 do
  local r = {id = ARGV[i], lease = ARGV[i + 1], kind = ARGV[i + 2], result = ARGV[i + 3], error = ARGV[i + 4],
             traceback = ARGV[i + 5]}
  local tk = P .. 't:' .. r.id
  local f = redis.call('HMGET', tk, 'state', 'lease', 'retry', 'max_retry', 'retry_delay', 'result_ttl', 'cancel',
    'priority', 'wf', 'pos')
  -- Taking it out of the running set is the last check: a task not in it has no live lease.
  if f[1] ~= 'running' or f[2] ~= r.lease or redis.call('ZREM', P .. 'running', r.id) == 0 then
    accepted[#accepted + 1] = 0
    refused = true
    if ARGV[7] == '1' then count = 0 end
  else
    -- A slot of its function's concurrency limit is given back, whatever the outcome.
    local slot = slotted and redis.call('HGET', tk, 'slot')
    if slot then
      use_limits()
      ready = ready + free_slot(slot)
      redis.call('HDEL', tk, 'slot')
    end
    local ttl = dttl
    if f[6] and f[6] ~= '' then ttl = tonumber(f[6]) end
    if f[7] == '1' then
      redis.call('HSET', tk, 'state', 'cancelled', 'finished', now)
      redis.call('HINCRBY', P .. 'stats', 'cancelled', 1)
      redis.call('EXPIRE', tk, math.max(ttl, 1))
      if f[9] then
        use_workflows()
        wf_failed(f[9], f[10], 'step ' .. r.id .. ' was cancelled', r.id)
      end
    elseif r.kind == 'release' then
      redis.call('HSET', tk, 'state', 'queued', 'eta', now)
      redis.call('HDEL', tk, 'lease')
      requeue(r.id, f[8], true)
      redis.call('HINCRBY', P .. 'stats', 'released', 1)
      ready = ready + 1
    elseif r.kind == 'ok' then
      redis.call('HSET', tk, 'state', 'done', 'finished', now, 'result', r.result)
      done_n = done_n + 1
      if ttl > 0 then redis.call('EXPIRE', tk, ttl) else redis.call('DEL', tk) end
      if f[9] then
        use_workflows()
        wf_leaf_done(r.id, f[9], f[10], r.result)
      end
    else
      failed_n = failed_n + 1
      local retry = (tonumber(f[3]) or 0) + 1
      local max_retry = tonumber(f[4]) or 1
      local next_in = -1
      redis.call('HSET', tk, 'retry', retry, 'error', r.error, 'traceback', r.traceback, 'finished', now)
      if r.kind == 'error' and retry <= max_retry then
        redis.call('HSET', tk, 'state', 'failed')
        next_in = 0
        if f[5] == '1' then
          next_in = 1 + 2 ^ retry
          local eta = now + next_in
          redis.call('HSET', tk, 'eta', eta)
          redis.call('ZADD', P .. 'delayed', eta, r.id)
        else
          redis.call('HSET', tk, 'eta', now)
          requeue(r.id, f[8])
          ready = ready + 1
        end
        redis.call('HINCRBY', P .. 'stats', 'retried', 1)
      else
        redis.call('HSET', tk, 'state', 'dead')
        redis.call('ZADD', P .. 'dead', now, r.id)
        redis.call('HINCRBY', P .. 'stats', 'dead', 1)
        if f[9] then
          use_workflows()
          wf_failed(f[9], f[10], 'step ' .. r.id .. ' failed: ' .. r.error, r.id)
        end
      end
      failed[#failed + 1] = r.id
      failed[#failed + 1] = retry
      failed[#failed + 1] = max_retry
      failed[#failed + 1] = next_in
    end
    accepted[#accepted + 1] = 1
    if watched and r.kind ~= 'release' and redis.call('ZSCORE', P .. 'waiting', r.id) then
      redis.call('PUBLISH', P .. 'finished', r.id)
    end
  end
end
if done_n > 0 then
  redis.call('HINCRBY', P .. 'stats', 'done', done_n)
  redis.call('HINCRBY', P .. 'rate', 'd:' .. bucket, done_n)
end
if failed_n > 0 then
  redis.call('HINCRBY', P .. 'stats', 'errors', failed_n)
  redis.call('HINCRBY', P .. 'rate', 'f:' .. bucket, failed_n)
end
-- include: lease.lua
-- include: seen.lua
ready = ready + wf_ready
if ready > 0 then redis.call('PUBLISH', P .. 'wake', ready) end
if wid ~= '' and not refused then mark_seen() end
return {accepted, out, more and 1 or 0, failed}
