-- lease.lua: leases up to `count` ready tasks to worker `wid`.
--
-- Fragment: its text replaces a "-- include: lease.lua" line (ppq/store/scripts.py).
-- Expects: P      the key prefix, ppq:<queue_index>:
--          wid    the worker's id
--          count  how many tasks to lease (0: none)
--          lt     lease seconds
--          nonce  random, made by the master for this call
--          now    from now.lua
-- Sets:    out    the leased tasks, rows of {id, body, retry, lease, ready since}, in queue
--                 order; each lease is nonce .. ':' .. the row's place in out, so it is
--                 unguessable and distinct per task
--          expiries, add_running  its own helpers (running-set entries added in bulk)
-- Changes: ids come off the front of P..'queue'; a waiting task (queued or failed) becomes
--          running in its record t:<id> and in P..'running' (score: lease deadline), its
--          de-duplication key is freed in P..'keys'; stats 'leased' counts them. Ids of
--          tasks no longer waiting (cancelled, say) are dropped. Nothing is leased while
--          the queue_index (field 'queue' of P..'paused') or the worker (field
--          'worker:' .. wid) is paused.

-- Paused: one HMGET, and only when something is to be leased.
if count > 0 then
  local paused = redis.call('HMGET', P .. 'paused', 'queue', 'worker:' .. wid)
  if paused[1] or paused[2] then count = 0 end
end
local out = {}
-- Running-set entries of the leased tasks, added in bulk.
local expiries = {}
local function add_running()
  if #expiries > 0 then redis.call('ZADD', P .. 'running', unpack(expiries)) end
  expiries = {}
end
while #out < count do
  -- Ids of tasks no longer waiting (cancelled, say) are dropped as they come out.
  local ids = redis.call('LPOP', P .. 'queue', math.min(count - #out, 1000))
  if not ids then break end
  for _, id in ipairs(ids) do
    local tk = P .. 't:' .. id
    local f = redis.call('HMGET', tk, 'state', 'key', 'body', 'retry', 'eta', 'created', 'attempts')
    if f[1] == 'queued' or f[1] == 'failed' then
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
  end
end
add_running()
if #out > 0 then redis.call('HINCRBY', P .. 'stats', 'leased', #out) end
