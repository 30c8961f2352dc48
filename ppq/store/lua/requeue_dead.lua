-- requeue_dead.lua: puts dead tasks back at the end of the queue (their priority's ready
-- list, ready.lua), their retries and lease expiries counted from zero again and their
-- expiry (field 'expires') dropped: asked for by hand, they run. Run by Store.requeue_dead.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P  the key prefix, ppq:<queue_index>:
-- ARGV[2]...  the ids to requeue; none: every dead task
--
-- Returns {requeued, steps}: the ids requeued (those that were dead and still have a record),
-- and the dead ones that are steps of a workflow (field 'wf'), left dead: a step is never
-- requeued alone, since its workflow ended when it went dead (the steps after it cancelled,
-- its group's results dropped) and its result would go nowhere. When ids are given and any of
-- them is such a step, nothing is requeued.

-- include: now.lua
local P = ARGV[1]
-- include: ready.lua
local ids = {}
if #ARGV == 1 then ids = redis.call('ZRANGE', P .. 'dead', 0, -1) else
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end end
local function step_of_workflow(id)
  local wf = redis.call('HGET', P .. 't:' .. id, 'wf')
  return wf and wf ~= '' and redis.call('ZSCORE', P .. 'dead', id)
end
local done, steps = {}, {}
if #ARGV > 1 then
  for _, id in ipairs(ids) do
    if step_of_workflow(id) then steps[#steps + 1] = id end
  end
  if #steps > 0 then return {done, steps} end
end
for _, id in ipairs(ids) do
  if step_of_workflow(id) then
    steps[#steps + 1] = id
  elseif redis.call('ZREM', P .. 'dead', id) == 1 then
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
return {done, steps}
