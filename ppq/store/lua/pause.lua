-- pause.lua: pauses or resumes leasing, for a whole queue_index or for one worker.
-- Run by Store.pause and Store.resume.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P     the key prefix, ppq:<queue_index>:
-- ARGV[2]  on    '1': pause, '0': resume
-- ARGV[3]  wid   the worker to pause or resume; '' for the whole queue_index
--
-- Returns 1 if the state changed, 0 if it already was as asked, -1 (nothing changed) for a
-- worker that is neither listed in P..'workers:seen' nor paused. A pause is the field
-- 'queue' or 'worker:' .. wid of P..'paused', its value the time it began; lease.lua leases
-- nothing while either is set. A resume publishes 0 on P..'wake', which wakes every
-- long-poll of the queue_index to look again.

-- include: now.lua
local P, on, wid = ARGV[1], ARGV[2] == '1', ARGV[3]
local field = 'queue'
if wid ~= '' then field = 'worker:' .. wid end
local was = redis.call('HEXISTS', P .. 'paused', field) == 1
if wid ~= '' and not was and not redis.call('ZSCORE', P .. 'workers:seen', wid) then return -1 end
if on == was then return 0 end
if on then
  redis.call('HSET', P .. 'paused', field, now)
else
  redis.call('HDEL', P .. 'paused', field)
  redis.call('PUBLISH', P .. 'wake', 0)
end
return 1
