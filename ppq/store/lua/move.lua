-- move.lua: moves delayed tasks, and failed ones waiting out their retry backoff, whose
-- time has come to the end of the queue. Run by Store.move_due.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  limit  most tasks moved in one call
-- ARGV[3]  since  the server's time this master's previous call returned (0: none)
--
-- Returns {moved, next, now}: how many were moved, the next time something is due (a
-- string) or false: the next eta in P..'delayed', or the next time a function held back
-- by its rate limit may start a task (P..'throttled', limits.lua), whichever is sooner;
-- and the server's time (a string).
-- Publishes P..'wake' with the tasks moved plus the functions held back whose time came
-- after `since`, so that a waiting long-poll leases them when their tokens are due.

-- include: now.lua
local P, limit, since = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]) or 0
local ids = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, limit)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. 'delayed', id)
  local tk = P .. 't:' .. id
  local state = redis.call('HGET', tk, 'state')
  if state == 'delayed' or state == 'failed' then
    if state == 'delayed' then redis.call('HSET', tk, 'state', 'queued') end
    redis.call('RPUSH', P .. 'queue', id)
    moved = moved + 1
  end
end
local due = redis.call('ZCOUNT', P .. 'throttled', '(' .. since, now)
if moved + due > 0 then redis.call('PUBLISH', P .. 'wake', moved + due) end
local nxt = redis.call('ZRANGE', P .. 'delayed', 0, 0, 'WITHSCORES')[2]
local held = redis.call('ZRANGEBYSCORE', P .. 'throttled', '(' .. now, '(inf', 'WITHSCORES', 'LIMIT', 0, 1)[2]
if held and (not nxt or tonumber(held) < tonumber(nxt)) then nxt = held end
return {moved, nxt or false, tostring(now)}
