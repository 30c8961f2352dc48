-- held.lua: wakes long-polls when functions held back by their rate limit get their next
-- token. Run by Store.wake_held, by each master's mover duty.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P      the key prefix, ppq:<queue_index>:
-- ARGV[2]  since  the server's time this master's previous call returned (0: none)
--
-- Returns {due, next, now}: how many functions of P..'throttled' (limits.lua) came due after
-- `since`, published on P..'wake' so that as many waiting long-polls lease their tasks; the
-- next time one is due after now (a string) or false (none, or only functions waiting for a
-- slot of their concurrency limit: report.lua and reap.lua wake those); and the server's
-- time (a string).

-- include: now.lua
local P, since = ARGV[1], tonumber(ARGV[2]) or 0
local due = redis.call('ZCOUNT', P .. 'throttled', '(' .. since, now)
if due > 0 then redis.call('PUBLISH', P .. 'wake', due) end
local nxt = redis.call('ZRANGEBYSCORE', P .. 'throttled', '(' .. now, '(inf', 'WITHSCORES', 'LIMIT', 0, 1)[2]
return {due, nxt or false, tostring(now)}
