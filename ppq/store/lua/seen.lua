-- seen.lua: mark_seen(), which lists a worker as alive.
--
-- Fragment: its text replaces a "-- include: seen.lua" line (ppq/store/scripts.py).
-- Expects: P     the key prefix, ppq:<queue_index>:
--          wid   the worker's id
--          seen  seconds until the worker counts as gone
--          maxw  most workers listed at once
--          now   from now.lua
-- Sets:    mark_seen  a function: lists wid in P..'workers:seen' until now + seen (or later,
--                     as it was: a long-poll lists its worker past its own end), if it is
--                     listed already or fewer than maxw workers are (else changes nothing).

local function mark_seen()
  local sk = P .. 'workers:seen'
  -- Listed already (the usual case): one ZADD moves its time on. XX: only if listed; GT: only
  -- later; CH: 1 when it did (0: not listed, or listed until then or later: the ZADD NX below
  -- changes nothing then).
  if redis.call('ZADD', sk, 'XX', 'GT', 'CH', now + seen, wid) == 0 and redis.call('ZCARD', sk) < maxw then
    redis.call('ZADD', sk, 'NX', now + seen, wid)
  end
end
