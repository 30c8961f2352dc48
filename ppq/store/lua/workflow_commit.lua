-- workflow_commit.lua: makes a big workflow live once workflow_stage.lua stored all of its
-- nodes, in a few commands whatever its size. Run by Store.push_workflow.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  root    the id of the workflow's root node
-- ARGV[3]  token   the staging's owner (workflow_begin.lua)
-- ARGV[4]  digest  kept in the root's field 'digest' (as workflow_push.lua)
-- ARGV[5]  leaves  the workflow's leaves (added to stats 'pushed')
-- ARGV[6]  pend    the leaves stored 'pending' (added to stats 'pending')
-- ARGV[7]  hold    seconds from now before the staging counts abandoned
-- ARGV[8]  node    the root, as workflow_push.lua takes a node (its record: a chain,
--                  group or chord, 'running')
--
-- Returns {'ok', 0} once live; {'lost', 0} when the token is not the staging's, its state
-- not 'staging' or not every node is stored; {'taken', root} when t:<root> exists (a task
-- pushed meanwhile under that id): nothing is written then. Live: t:<root> written (with
-- 'created', 'digest', 'started'), P..'stage:<root>:kids' renamed t:<root>:kids, the stats
-- counted, and the staging's state 'releasing': its staged first steps are moved to their
-- ready lists by workflow_settle.lua, the owner's calls right after, or any master's duty
-- once its hold runs out.

-- include: now.lua
local P, root, token, digest, hold = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[7])
local leaves, pend = tonumber(ARGV[5]), tonumber(ARGV[6])
local sk = P .. 'stage:' .. root
local entry = redis.call('HMGET', sk, 'token', 'state', 'written', 'total')
if entry[1] ~= token or entry[2] ~= 'staging' or entry[3] ~= entry[4] then return {'lost', 0} end
local tk = P .. 't:' .. root
if redis.call('EXISTS', tk) == 1 then return {'taken', root} end
local fields = cmsgpack.unpack(ARGV[8])[2]
fields[#fields + 1] = 'created'
fields[#fields + 1] = now
fields[#fields + 1] = 'digest'
fields[#fields + 1] = digest
for j = 1, #fields, 2 do
  if fields[j] == 'state' and fields[j + 1] == 'running' then
    fields[#fields + 1] = 'started'
    fields[#fields + 1] = now
    break
  end
end
redis.call('HSET', tk, unpack(fields))
if redis.call('EXISTS', sk .. ':kids') == 1 then redis.call('RENAME', sk .. ':kids', tk .. ':kids') end
redis.call('HINCRBY', P .. 'stats', 'pushed', leaves)
if pend > 0 then redis.call('HINCRBY', P .. 'stats', 'pending', pend) end
redis.call('HSET', sk, 'state', 'releasing')
redis.call('ZADD', P .. 'staged', now + hold, root)
return {'ok', 0}
