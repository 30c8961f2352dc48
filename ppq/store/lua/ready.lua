-- ready.lua: the ready lists of the priorities, and putting a task back on its own.
--
-- Fragment: its text replaces a "-- include: ready.lua" line (ppq/store/scripts.py).
-- Expects: P     the key prefix, ppq:<queue_index>:
-- Sets:    ready_list  a function: the list of ready ids of a priority (the record's field
--                      'priority', a string, stored only when it is not 0): P..'queue' for
--                      0 (nil, ''), else P..'queue:p:<priority>'
--          requeue     a function (id, priority, front): puts id at the end of its
--                      priority's ready list (at its front when `front`), and names a
--                      priority above 0 in P..'priorities' (a zset, score: the priority), so
--                      that a lease finds the non-empty lists without looking at the others

local function ready_list(pri)
  if not pri or pri == '' or pri == '0' then return P .. 'queue' end
  return P .. 'queue:p:' .. pri
end

local function requeue(id, pri, front)
  local list = ready_list(pri)
  redis.call(front and 'LPUSH' or 'RPUSH', list, id)
  if list ~= P .. 'queue' then redis.call('ZADD', P .. 'priorities', tonumber(pri), pri) end
end
