-- schedule_change.lua: pauses, resumes or removes a schedule, or records a run-now. Run by
-- Store.schedule_change.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  name   the schedule's name
-- ARGV[3]  op     'pause', 'resume', 'remove', or 'ran' (a run-now was pushed)
-- ARGV[4]  value  for 'resume': the next tick (ms; ticks that fell due while it was paused
--                 are skipped); for 'ran': the pushed task's id
-- ARGV[5]  at     for 'ran': when it was pushed (ms)
--
-- Returns -1 (nothing changed) if no schedule has that name, 0 if it was already as asked,
-- 1 if it changed.

local P, name, op = ARGV[1], ARGV[2], ARGV[3]
local sk = P .. 's:' .. name
if redis.call('EXISTS', sk) == 0 then return -1 end
local paused = redis.call('HGET', sk, 'paused') == '1'
if op == 'pause' then
  if paused then return 0 end
  redis.call('HSET', sk, 'paused', '1')
  redis.call('ZREM', P .. 'schedules', name)
elseif op == 'resume' then
  if not paused then return 0 end
  redis.call('HSET', sk, 'paused', '0', 'next', ARGV[4])
  redis.call('ZADD', P .. 'schedules', ARGV[4], name)
elseif op == 'remove' then
  redis.call('DEL', sk)
  redis.call('ZREM', P .. 'schedules', name)
  redis.call('SREM', P .. 'schedules:names', name)
elseif op == 'ran' then
  redis.call('HSET', sk, 'last_run', ARGV[5], 'last_id', ARGV[4])
else
  return redis.error_reply('schedule_change.lua: unknown op ' .. op)
end
return 1
