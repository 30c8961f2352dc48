-- module.lua: module_of(body), the module a task runs, read from its record's body.
--
-- Fragment: its text replaces a "-- include: module.lua" line (ppq/store/scripts.py).
-- Expects: nothing.
-- Sets:    module_of  a function: the module named by a body as ppq.task.encode_body lays it
--                     out (a msgpack map of 8 entries opening with "f", the function, then
--                     "m", the module, each a msgpack string), or nil for a body laid out
--                     otherwise. Tasks are routed by it (lease.lua) without a field of
--                     their own.
--          target_of  a function: 'module.func', the function a body names (nil as for
--                     module_of); rate and concurrency limits are kept by it (limits.lua)
--          msgpack_str, byte, sub  its own helpers

local byte, sub = string.byte, string.sub
-- The length of the msgpack string whose header starts at byte p of s, and where its text
-- starts; nil if no string header is there.
local function msgpack_str(s, p)
  local b, n1, n2 = byte(s, p, p + 2)
  if not b then return nil end
  if b >= 160 and b <= 191 then return b - 160, p + 1 end
  if b == 217 and n1 then return n1, p + 2 end
  if b == 218 and n2 then return n1 * 256 + n2, p + 3 end
  return nil
end

local function module_of(body)
  if not body then return nil end
  local map, key, f = byte(body, 1, 3)
  -- A map of 8 entries (0x88) whose first key is "f" (0xa1 'f').
  if map ~= 136 or key ~= 161 or f ~= 102 then return nil end
  local n, at = msgpack_str(body, 4)
  if not n then return nil end
  key, f = byte(body, at + n, at + n + 1)
  if key ~= 161 or f ~= 109 then return nil end
  n, at = msgpack_str(body, at + n + 2)
  if not n or at + n - 1 > #body then return nil end
  return sub(body, at, at + n - 1)
end

local function target_of(body)
  local mod = module_of(body)
  if not mod then return nil end
  local n, at = msgpack_str(body, 4)
  return mod .. '.' .. sub(body, at, at + n - 1)
end
