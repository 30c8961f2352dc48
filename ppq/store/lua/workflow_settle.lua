-- workflow_settle.lua: moves one staging of a big workflow on by a bounded step: a live
-- one's staged first steps to their ready lists, an abandoned one's nodes deleted. Run by
-- Store.push_workflow (its own staging) and by every master's duty (Store.settle_staged).
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  root    the staging's root id; '' for the first whose hold ran out (its score
--                  in P..'staged' passed), whatever its state
-- ARGV[3]  token   with a root: its owner's token, to give up a staging in state
--                  'staging' (a node's id found taken); '' otherwise
-- ARGV[4]  ids     the most ready ids this call moves (state 'releasing')
-- ARGV[5]  count   the most nodes this call deletes (state 'cleaning')
-- ARGV[6]  hold    seconds from now before the staging counts abandoned again
--
-- A staging found in state 'staging' with its hold run out, or given up by its owner, turns
-- 'cleaning'. Then, by state:
--   releasing  up to ids ids move from the head of P..'stage:<root>:q:<priority>' (0-9)
--              to the end of their ready lists (ready.lua), in order; P..'wake' is
--              published with their number while a long-poll is registered in
--              P..'waiters'; once none is left the staging is deleted
--   cleaning   up to count nodes are deleted from the last stored back ('written' goes
--              down): t:<root>.<i> and t:<root>.<i>:kids, a 'queued' one's id popped off the
--              end of its staged ready list; node 0 is P..'stage:<root>:kids' (t:<root> is
--              never written before the commit); at 0 the staging is deleted (with the
--              parts of a node stored so far, P..'stage:<root>:part'). A
--              workflow_begin.lua with the same digest takes it over from what is left
--   staging    (another owner's, alive) nothing
-- Returns {root, state, left}: the state it was found in ('none': no staging; root ''
-- when none was due), and what is left to move or delete (0: the staging is gone).

-- include: now.lua
local P, root, token, hold = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local budget, count = tonumber(ARGV[4]), tonumber(ARGV[5])
-- include: ready.lua
local given = root ~= ''
if not given then
  local due = redis.call('ZRANGEBYSCORE', P .. 'staged', '-inf', now, 'LIMIT', 0, 1)
  if #due == 0 then return {'', 'none', 0} end
  root = due[1]
end
local sk = P .. 'stage:' .. root
local entry = redis.call('HMGET', sk, 'state', 'token', 'written')
local state = entry[1]
if not state then
  redis.call('ZREM', P .. 'staged', root)
  return {root, 'none', 0}
end
if state == 'staging' then
  if given and (token == '' or entry[2] ~= token) then return {root, state, tonumber(entry[3])} end
  state = 'cleaning'
  redis.call('HSET', sk, 'state', state)
end
local function drop()
  local gone = {sk, sk .. ':kids', sk .. ':part'}
  for pri = 0, 9 do gone[#gone + 1] = sk .. ':q:' .. pri end
  redis.call('DEL', unpack(gone))
  redis.call('ZREM', P .. 'staged', root)
end
local left = 0
if state == 'releasing' then
  local moved = 0
  for pri = 0, 9 do
    local staged = sk .. ':q:' .. pri
    while moved < budget do
      local ids = redis.call('LRANGE', staged, 0, math.min(999, budget - moved - 1))
      if #ids == 0 then break end
      redis.call('LTRIM', staged, #ids, -1)
      redis.call('RPUSH', ready_list(tostring(pri)), unpack(ids))
      if pri > 0 then redis.call('ZADD', P .. 'priorities', pri, pri) end
      moved = moved + #ids
    end
    left = left + redis.call('LLEN', staged)
  end
  if moved > 0 and redis.call('ZCOUNT', P .. 'waiters', now, '+inf') > 0 then
    redis.call('PUBLISH', P .. 'wake', moved)
  end
else
  local written = tonumber(entry[3])
  local stop = math.max(written - count, 0)
  for i = written - 1, stop, -1 do
    if i > 0 then
      local tk = P .. 't:' .. root .. '.' .. i
      local f = redis.call('HMGET', tk, 'state', 'priority')
      if f[1] == 'queued' then redis.call('RPOP', sk .. ':q:' .. (f[2] or '0')) end
      redis.call('DEL', tk, tk .. ':kids')
    end
  end
  left = stop
  redis.call('HSET', sk, 'written', left)
end
if left == 0 then
  drop()
else
  redis.call('ZADD', P .. 'staged', now + hold, root)
end
return {root, state, left}
