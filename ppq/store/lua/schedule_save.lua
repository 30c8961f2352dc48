-- schedule_save.lua: stores a periodic schedule, new or declared again. Run by
-- Store.schedule_save.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  name   the schedule's name
-- ARGV[3]  def    its definition (msgpack of its plain form, ppq/schedules.py)
-- ARGV[4]  next   its first tick (ms since the epoch), used when it is new or its definition changed
-- ARGV[5]  mode   'add': refuse a name already stored; 'put': store it, keeping the state
--                 (paused, last run) of one already stored
-- ARGV[6]  source who declared it: 'config' (config or @periodic, stored at a master's start)
--                 or 'live' (schedule_add)
--
-- Returns 0 (nothing changed) for 'add' of a stored name, 1 when it is new, 2 when the same
-- definition was stored already (nothing changed), 3 when its definition was replaced. The
-- schedule is the hash P..'s:'..name (def, next, paused, source, created, last_run, last_id);
-- P..'schedules' ranks the names of the unpaused ones by their next tick, P..'schedules:names'
-- holds them all.

-- include: now.lua
local P, name, def, nxt, mode, source = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = P .. 's:' .. name
if redis.call('EXISTS', sk) == 1 then
  if mode == 'add' then return 0 end
  if redis.call('HGET', sk, 'def') == def then return 2 end
  redis.call('HSET', sk, 'def', def, 'next', nxt, 'source', source)
  if redis.call('HGET', sk, 'paused') ~= '1' then redis.call('ZADD', P .. 'schedules', nxt, name) end
  return 3
end
redis.call('HSET', sk, 'def', def, 'next', nxt, 'paused', '0', 'source', source, 'created', now)
redis.call('ZADD', P .. 'schedules', nxt, name)
redis.call('SADD', P .. 'schedules:names', name)
return 1
