-- workflow_begin.lua: opens (or takes over) the staging of a big workflow, stored in chunks
-- by workflow_stage.lua and made live by workflow_commit.lua. Run by Store.push_workflow.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  root    the id of the workflow's root node
-- ARGV[3]  digest  what identifies this workflow's records (as workflow_push.lua)
-- ARGV[4]  total   its number of nodes, the root's included
-- ARGV[5]  token   what names this staging's owner: only it stores chunks and commits
-- ARGV[6]  hold    seconds the staging may go without progress before any master's
--                  duty (workflow_settle.lua) counts it abandoned
--
-- The staging is P..'stage:<root>' (token, digest, total, written: the nodes stored so
-- far, state: staging | cleaning | releasing) and root's score in P..'staged' (the time
-- it counts abandoned).
-- Returns {what, n}:
--   {'new', 0}          a staging opened: store from node 0
--   {'resume', n}       a staging of the same digest existed (a retried push whose first
--                       master died or was too slow): taken over, its n nodes kept; the
--                       previous owner's next chunk finds its token replaced
--   {'stored', 0}       t:<root> exists with the same digest: stored already
--   {'releasing', 0}    the same, with first steps still to be put on their ready lists
--                       (workflow_settle.lua)
--   {'taken', root}     t:<root> exists with another digest, or another workflow's staging
--                       holds the id: nothing is written

-- include: now.lua
local P, root, digest, total, token, hold = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local sk = P .. 'stage:' .. root
local entry = redis.call('HMGET', sk, 'digest', 'state', 'written')
if entry[1] == digest and entry[2] == 'releasing' then return {'releasing', 0} end
if redis.call('EXISTS', P .. 't:' .. root) == 1 then
  if redis.call('HGET', P .. 't:' .. root, 'digest') ~= digest then return {'taken', root} end
  return {'stored', 0}
end
if entry[1] and (entry[1] ~= digest or entry[2] == 'releasing') then return {'taken', root} end
redis.call('ZADD', P .. 'staged', now + hold, root)
if entry[1] then
  redis.call('HSET', sk, 'token', token, 'state', 'staging')
  return {'resume', tonumber(entry[3])}
end
redis.call('HSET', sk, 'token', token, 'digest', digest, 'total', total, 'written', 0, 'state', 'staging')
return {'new', 0}
