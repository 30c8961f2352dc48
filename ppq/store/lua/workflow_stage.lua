-- workflow_stage.lua: stores one chunk of a big workflow's nodes, none of them runnable
-- yet. Run by Store.push_workflow between workflow_begin.lua and workflow_commit.lua.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P       the key prefix, ppq:<queue_index>:
-- ARGV[2]  root    the id of the workflow's root node
-- ARGV[3]  token   the staging's owner (workflow_begin.lua)
-- ARGV[4]  first   the place of this chunk's first node (from 0, the root): the staging's
--                  'written', or the chunk is out of step and nothing is written
-- ARGV[5]  hold    seconds from now before the staging counts abandoned
-- ARGV[6]...       the chunk's nodes, in order, each as workflow_push.lua takes them; node
--                  i's id must be <root>.<i> (flows.Builder makes them so): workflow_settle.lua
--                  finds what to delete by those names. A node of many children comes in
--                  parts, each alone in its call, [id, 0, ids, offset]: 'offset' of its
--                  children's ids sent before (0: the first part), these appended to
--                  P..'stage:<root>:part'; then [id, fields, ids, offset], the last part
--                  with its record, which puts that list in its place ('written' counts a
--                  node once its last part is stored; a part out of step writes nothing)
--
-- Returns {'ok', written} once stored (written: the nodes stored so far); {'lost', 0} when
-- the token is not the staging's or its state is not 'staging' (taken over, or found
-- abandoned); {'taken', id} when a node's record t:<id> exists already (another task's):
-- nothing of the chunk is written. Each node is written as workflow_push.lua writes it
-- ('created', 'eta', 'started', 'expires'), but for the root, whose record waits for
-- workflow_commit.lua and whose children's list is kept in P..'stage:<root>:kids'; a leaf
-- that starts at once is 'queued' on no ready list: its id is appended to
-- P..'stage:<root>:q:<priority>' (0-9), moved to the ready list once live.

-- include: now.lua
local P, root, token, first, hold = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local sk = P .. 'stage:' .. root
local entry = redis.call('HMGET', sk, 'token', 'state', 'written')
if entry[1] ~= token or entry[2] ~= 'staging' or tonumber(entry[3]) ~= first then return {'lost', 0} end
local nodes, keys = {}, {}
for j = 6, #ARGV do
  local node = cmsgpack.unpack(ARGV[j])
  local at = first + j - 6
  if node[1] ~= (at == 0 and root or root .. '.' .. at) then
    return redis.error_reply('workflow_stage: node ' .. at .. ' of ' .. root .. ' is named ' .. tostring(node[1]))
  end
  nodes[#nodes + 1] = node
  if at > 0 then keys[#keys + 1] = P .. 't:' .. node[1] end
end
if #keys > 0 and redis.call('EXISTS', unpack(keys)) > 0 then
  for _, key in ipairs(keys) do
    if redis.call('EXISTS', key) == 1 then return {'taken', string.sub(key, #P + 3)} end
  end
end
-- The parts of a node of many children.
local part, offset = sk .. ':part', tonumber(nodes[1][4] or 0)
if offset == 0 then
  redis.call('DEL', part)
elseif #nodes > 1 or redis.call('LLEN', part) ~= offset then
  return {'lost', 0}
end
if nodes[1][2] == 0 then
  if #nodes > 1 then return redis.error_reply('workflow_stage: a part of node ' .. first .. ' comes with others') end
  local kids = nodes[1][3]
  for j = 1, #kids, 1000 do
    redis.call('RPUSH', part, unpack(kids, j, math.min(j + 999, #kids)))
  end
  redis.call('ZADD', P .. 'staged', now + hold, root)
  return {'ok', first}
end
-- Ready ids by priority, appended to their staged lists 1000 at a time.
local fresh = {}
local function flush(pri)
  redis.call('RPUSH', sk .. ':q:' .. pri, unpack(fresh[pri]))
  fresh[pri] = {}
end
for i, node in ipairs(nodes) do
  local id, fields, kids = node[1], node[2], node[3]
  local list = P .. 't:' .. id .. ':kids'
  if first + i == 1 then list = sk .. ':kids' end
  if offset > 0 then
    -- The node's earlier parts: its list so far.
    redis.call('RENAME', part, list)
  elseif first + i == 1 then
    redis.call('DEL', list)
  end
  if first + i > 1 then
    local state, pri = nil, '0'
    for j = 1, #fields, 2 do
      local name, value = fields[j], fields[j + 1]
      if name == 'expires' and tonumber(value) <= 1000000000 then fields[j + 1] = now + tonumber(value) end
      if name == 'state' then state = value end
      if name == 'priority' then pri = value end
    end
    fields[#fields + 1] = 'created'
    fields[#fields + 1] = now
    if state == 'queued' then
      fields[#fields + 1] = 'eta'
      fields[#fields + 1] = now
      local ids = fresh[pri] or {}
      fresh[pri] = ids
      ids[#ids + 1] = id
      if #ids == 1000 then flush(pri) end
    elseif state == 'running' then
      fields[#fields + 1] = 'started'
      fields[#fields + 1] = now
    end
    redis.call('HSET', P .. 't:' .. id, unpack(fields))
  end
  for j = 1, #kids, 1000 do
    redis.call('RPUSH', list, unpack(kids, j, math.min(j + 999, #kids)))
  end
end
for pri, ids in pairs(fresh) do
  if #ids > 0 then flush(pri) end
end
redis.call('ZADD', P .. 'staged', now + hold, root)
return {'ok', redis.call('HINCRBY', sk, 'written', #nodes)}
