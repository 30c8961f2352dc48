-- purge_dead.lua: deletes dead tasks and their records. Run by Store.purge_dead.
--
-- KEYS: none; every key is ARGV[1] .. a name (the layout: ppq/store/keys.py).
-- ARGV[1]  P  the key prefix, ppq:<queue_index>:
-- ARGV[2]...  the ids to delete; none: every dead task
--
-- Returns how many were deleted.

local P = ARGV[1]
local ids = {}
if #ARGV == 1 then ids = redis.call('ZRANGE', P .. 'dead', 0, -1) else
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', P .. 'dead', id) == 1 then
    redis.call('DEL', P .. 't:' .. id)
    n = n + 1
  end
end
return n
