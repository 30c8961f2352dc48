-- heartbeat.lua: extends the leases a worker holds and lists the worker as alive.
-- Run by Store.heartbeat.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P     the key prefix, ppq:<queue_index>:
-- ARGV[2]  wid   the worker
-- ARGV[3]  lt    lease seconds, from now
-- ARGV[4]  seen  seconds until the worker counts as gone
-- ARGV[5]  maxw  most workers listed at once
-- ARGV[6]  info  msgpack of the worker's info, stored in P..'workers'
-- ARGV[7]...     id/lease pairs, the tasks the worker runs
--
-- Returns the ids whose lease is lost (or whose task was asked to cancel): the worker
-- stops those. Returns false (nil), changing nothing, for a worker not listed yet while
-- maxw workers are.

-- include: now.lua
local P, wid, lt, seen, maxw = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not redis.call('ZSCORE', P .. 'workers:seen', wid) and redis.call('ZCARD', P .. 'workers:seen') >= maxw then
  return false
end
local lost = {}
for i = 7, #ARGV, 2 do
  local id, lease = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HMGET', P .. 't:' .. id, 'lease', 'state', 'cancel')
  if cur[1] == lease and cur[2] == 'running' and redis.call('ZSCORE', P .. 'running', id) then
    redis.call('ZADD', P .. 'running', 'XX', now + lt, id)
    if cur[3] == '1' then lost[#lost + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
redis.call('HSET', P .. 'workers', wid, ARGV[6])
-- GT: a long-poll may have listed it for longer.
redis.call('ZADD', P .. 'workers:seen', 'GT', now + seen, wid)
return lost
