-- now.lua: the server's clock, read once at the top of a script.
--
-- Fragment: its text replaces a "-- include: now.lua" line (ppq/store/scripts.py).
-- Expects: nothing.
-- Sets:    now  the Redis server's time (TIME) in seconds, with microseconds; masters on
--               different machines agree on it, so leases and delays do not depend on
--               their clocks.
--          _t   TIME's raw reply.

local _t = redis.call('TIME')
local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000
