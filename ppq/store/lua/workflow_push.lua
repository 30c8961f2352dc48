-- workflow_push.lua: stores every node of one workflow and starts its root. Run by
-- Store.push_workflow.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  root    the id of the workflow's root node (the first node below)
-- ARGV[3]  digest  what identifies this workflow's records (kept in the root's field 'digest'):
--                  a push retried with the same records finds it and stores nothing
-- ARGV[4]  pend    the leaves stored 'pending' (added to stats 'pending': steps not started yet)
-- ARGV[5]...       one per node, the root first: the msgpack (strings as raw, no bin type: as
--                  cmsgpack reads them) of [id, [field, value, ...], [child id, ...]] (a leaf
--                  has a field 'body' and no children). An 'expires' not above 10**9 is seconds
--                  from now, stored as the time it names (as push.lua does)
--
-- Returns 1 when stored; 0 when t:<root> exists with the same digest (a retried push); else
-- the id of the first node whose record exists already (t:<root> of another task or
-- workflow, or any other node's id: a caller's workflow_id colliding with ids in use). Only 1
-- stores anything: no record of another task or workflow is ever written to.
-- Every record gets 'created'; the leaves count in stats 'pushed'. The master marks what
-- starts at once (the root, the first step of each chain started, each member of each group
-- started): a node in state 'running' gets 'started', a leaf in state 'queued' (its record's
-- 'eta') goes to the end of its priority's ready list (ready.lua), in order; P..'wake' is
-- published with their number while a long-poll is registered in P..'waiters'. The rest
-- waits, 'pending', for workflow.lua to start it.

-- include: now.lua
local P, root, digest, pend = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
-- include: ready.lua
if redis.call('EXISTS', P .. 't:' .. root) == 1 then
  if redis.call('HGET', P .. 't:' .. root, 'digest') == digest then return 0 end
  return root
end
-- Every id free, checked 1000 at a time before anything is written.
local nodes = {}
for i = 5, #ARGV, 1000 do
  local keys = {}
  for j = i, math.min(i + 999, #ARGV) do
    local node = cmsgpack.unpack(ARGV[j])
    nodes[#nodes + 1] = node
    keys[#keys + 1] = P .. 't:' .. node[1]
  end
  if redis.call('EXISTS', unpack(keys)) > 0 then
    for _, key in ipairs(keys) do
      if redis.call('EXISTS', key) == 1 then return string.sub(key, #P + 3) end
    end
  end
end
local leaves = 0
-- Ready ids by priority ('0': P..'queue'), appended to their lists 1000 at a time.
local fresh, ready = {}, 0
local function flush(pri)
  local ids = fresh[pri]
  redis.call('RPUSH', ready_list(pri), unpack(ids))
  if pri ~= '0' then redis.call('ZADD', P .. 'priorities', tonumber(pri), pri) end
  fresh[pri] = {}
end
for i, node in ipairs(nodes) do
  local id = node[1]
  local tk = P .. 't:' .. id
  local fields, kids = node[2], node[3]
  local state, pri = nil, '0'
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if name == 'expires' and tonumber(value) <= 1000000000 then fields[j + 1] = now + tonumber(value) end
    if name == 'body' then leaves = leaves + 1 end
    if name == 'state' then state = value end
    if name == 'priority' then pri = value end
  end
  fields[#fields + 1] = 'created'
  fields[#fields + 1] = now
  if i == 1 then
    fields[#fields + 1] = 'digest'
    fields[#fields + 1] = digest
  end
  if state == 'queued' then
    fields[#fields + 1] = 'eta'
    fields[#fields + 1] = now
    local ids = fresh[pri] or {}
    fresh[pri] = ids
    ids[#ids + 1] = id
    ready = ready + 1
    if #ids == 1000 then flush(pri) end
  elseif state == 'running' then
    fields[#fields + 1] = 'started'
    fields[#fields + 1] = now
  end
  redis.call('HSET', tk, unpack(fields))
  for j = 1, #kids, 1000 do
    redis.call('RPUSH', tk .. ':kids', unpack(kids, j, math.min(j + 999, #kids)))
  end
end
for pri, ids in pairs(fresh) do
  if #ids > 0 then flush(pri) end
end
redis.call('HINCRBY', P .. 'stats', 'pushed', leaves)
if pend > 0 then redis.call('HINCRBY', P .. 'stats', 'pending', pend) end
if ready > 0 and redis.call('ZCOUNT', P .. 'waiters', now, '+inf') > 0 then
  redis.call('PUBLISH', P .. 'wake', ready)
end
return 1
