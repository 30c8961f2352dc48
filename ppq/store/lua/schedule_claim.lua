-- schedule_claim.lua: claims one tick of a schedule, for one master alone, by moving the
-- schedule's next tick on from the tick it read (compare and set). Run by Store.schedule_claim
-- from every master's due-check.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  name   the schedule's name
-- ARGV[3]  tick   the due tick the master read (ms, as stored in 'next')
-- ARGV[4]  next   the tick that follows it (ms)
-- ARGV[5]  fire   the tick fired (ms), '' when the missed ticks are skipped
-- ARGV[6]  id     the id of the task to push for it ('' when skipped)
--
-- Returns 1 if this call claimed the tick, 0 (nothing changed) if the schedule is gone,
-- paused, or another master claimed it first. A claimed task id is added to
-- P..'schedules:pending' (score: the server's time) until Store.schedule_done takes it off
-- after the push; whoever finds it there later pushes it again under the same id, which
-- stores nothing twice.

-- include: now.lua
local P, name, tick, nxt, fire, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = P .. 's:' .. name
local stored = redis.call('HMGET', sk, 'next', 'paused')
if stored[1] ~= tick or stored[2] == '1' then return 0 end
redis.call('HSET', sk, 'next', nxt)
redis.call('ZADD', P .. 'schedules', nxt, name)
if id ~= '' then
  redis.call('HSET', sk, 'last_run', fire, 'last_id', id)
  redis.call('ZADD', P .. 'schedules:pending', now, id)
else
  redis.call('HSET', sk, 'skipped', tick)
end
return 1
