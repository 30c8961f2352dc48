-- seen.lua: mark_seen(), which lists a worker as alive.
--
-- Fragment: its text replaces a "-- include: seen.lua" line (ppq/store/scripts.py).
-- Expects: P     the key prefix, ppq:<queue_index>:
--          wid   the worker's id
--          seen  seconds until the worker counts as gone
--          maxw  most workers listed at once
--          now   from now.lua
-- Sets:    mark_seen  a function: lists wid in P..'workers:seen' until now + seen, if it is
--                     listed already or fewer than maxw workers are (else changes nothing).

local function mark_seen()
  local sk = P .. 'workers:seen'
  -- Listed already (the usual case): one ZADD moves its time on. XX: only if listed; CH: 1
  -- when it was (a score already equal gives 0, and the ZADD below changes nothing).
  if redis.call('ZADD', sk, 'XX', 'CH', now + seen, wid) == 0 and redis.call('ZCARD', sk) < maxw then
    redis.call('ZADD', sk, now + seen, wid)
  end
end
