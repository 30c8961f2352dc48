-- workflow_push.lua: stores every node of one workflow and starts its root. Run by
-- Store.push_workflow.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P     the key prefix, ppq:<queue_index>:
-- ARGV[2]  root  the id of the workflow's root node (the first node below)
-- ARGV[3]...     per node, its record then its children: id, nf, nf field/value pairs, nk,
--                nk child ids (a leaf has a 'body' and none). An 'expires' not above 10**9
--                is seconds from now, stored as the time it names (as push.lua does)
--
-- Returns 1, or 0 when t:<root> exists already (a retried push): nothing is stored then.
-- Every record gets 'created'; the leaves count in stats 'pushed'. The root starts at once
-- (workflow.lua's wf_start): its first leaves go to their ready lists, and P..'wake' is
-- published with their number while a long-poll is registered in P..'waiters'.

-- include: now.lua
local P, root = ARGV[1], ARGV[2]
-- include: ready.lua
-- include: workflow.lua
if redis.call('EXISTS', P .. 't:' .. root) == 1 then return 0 end
local i, leaves = 3, 0
while i <= #ARGV do
  local id, nf = ARGV[i], tonumber(ARGV[i + 1])
  local tk = P .. 't:' .. id
  local fields = {'created', now}
  for j = i + 2, i + 1 + 2 * nf, 2 do
    local name, value = ARGV[j], ARGV[j + 1]
    if name == 'expires' and tonumber(value) <= 1000000000 then value = now + tonumber(value) end
    if name == 'body' then leaves = leaves + 1 end
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('HSET', tk, unpack(fields))
  i = i + 2 + 2 * nf
  local nk = tonumber(ARGV[i])
  for j = i + 1, i + nk, 1000 do
    redis.call('RPUSH', tk .. ':kids', unpack(ARGV, j, math.min(j + 999, i + nk)))
  end
  i = i + 1 + nk
end
redis.call('HINCRBY', P .. 'stats', 'pushed', leaves)
wf_start(root, nil)
if wf_ready > 0 and redis.call('ZCOUNT', P .. 'waiters', now, '+inf') > 0 then
  redis.call('PUBLISH', P .. 'wake', wf_ready)
end
return 1
