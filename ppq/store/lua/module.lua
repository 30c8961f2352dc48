-- module.lua: module_of(body), the module a task runs, read from its record's body.
--
-- Fragment: its text replaces a "-- include: module.lua" line (ppq/store/scripts.py).
-- Expects: nothing.
-- Sets:    module_of  a function: the module named by a body as ppq.task.encode_body lays it
--                     out (a msgpack map of 8 entries opening with "f", the function, then
--                     "m", the module, each a msgpack string), or nil for a body laid out
--                     otherwise. Tasks are routed by it (lease.lua) without a field of
--                     their own.

local function module_of(body)
  if not body or string.sub(body, 1, 3) ~= '\136\161f' then return nil end
  -- The msgpack string at byte p: its text and the byte after it.
  local function str_at(p)
    local b = string.byte(body, p)
    if not b then return nil end
    if b >= 160 and b <= 191 then return string.sub(body, p + 1, p + b - 160), p + 1 + b - 160 end
    if b == 217 then
      local n = string.byte(body, p + 1) or 0
      return string.sub(body, p + 2, p + 1 + n), p + 2 + n
    end
    if b == 218 then
      local n = (string.byte(body, p + 1) or 0) * 256 + (string.byte(body, p + 2) or 0)
      return string.sub(body, p + 3, p + 2 + n), p + 3 + n
    end
    return nil
  end
  local _, after = str_at(4)
  if not after or string.sub(body, after, after + 1) ~= '\161m' then return nil end
  return (str_at(after + 2))
end
