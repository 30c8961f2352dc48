-- limits.lua: rate and concurrency limits per function ('module.func'), checked by lease.lua
-- for each task it would lease, and slots given back when a running task ends.
--
-- Fragment: its text replaces a "-- include: limits.lua" line (ppq/store/scripts.py).
-- Expects: P      the key prefix, ppq:<queue_index>:
--          now    from now.lua
-- Sets:    use_limits   use_limits(): makes the functions below; call it before any of them
--          load_limits  load_limits(): the limits of P..'limits' (one HLEN; with some, one
--                       HGETALL), as a table
--                       function -> {rate = tokens per second, cap = bucket size, conc = most
--                       running}, or false when there are none
--          room         room(lim, fn): how many tasks of fn may start now, and when the next
--                       may (now, its next token's time, or '+inf': when a slot frees)
--          admit        admit(lim, fn, tk): room(lim, fn) > 0; if so it takes fn's token and
--                       slot for the task of record tk (field 'slot' of tk names fn)
--          hold         hold(fn, id): sets id aside in P..'queue:f:' .. fn (at hold_flush)
--          hold_flush   hold_flush(lim): appends the held ids to their lists, each function
--                       in P..'throttled' scored by room's time (the caller counts them in
--                       stats 'parked')
--          free_slot    free_slot(fn): gives back a slot of fn; returns 1 when tasks of fn
--                       wait for it (their function made due now in P..'throttled'), else 0
-- Local:   inside use_limits, its own helpers and state: PER (a unit's seconds), bucket
--          and buckets (the token buckets read this call), held (the ids held by function)
-- Keys:    P..'limits'     hash 'rate:<fn>' -> 'N/s' | 'N/m' | 'N/h', 'conc:<fn>' -> N
--          P..'buckets'    hash fn -> 'tokens:time' (a full bucket holds a second's worth of
--                          tokens, at least 1)
--          P..'slots'      hash fn -> tasks of fn running under its concurrency limit
--          P..'throttled'  zset fn -> when a task of fn may start next
--          stats 'parked'  counts the ids in all the P..'queue:f:<fn>' lists too

-- Nothing of it is made until use_limits() is called: Redis pays for every function and
-- table a script creates, and most calls never need them.
local load_limits, room, admit, hold, hold_flush, free_slot
local function use_limits()
  if load_limits then return end
  local PER = {s = 1, m = 60, h = 3600}
  load_limits = function()
    if redis.call('HLEN', P .. 'limits') == 0 then return false end
    local raw = redis.call('HGETALL', P .. 'limits')
    local lim = {}
    for i = 1, #raw, 2 do
      local kind, fn = string.match(raw[i], '^(%a+):(.+)$')
      if kind then
        local l = lim[fn] or {}
        lim[fn] = l
        if kind == 'rate' then
          local n, unit = string.match(raw[i + 1], '^([%d%.]+)/(%a)$')
          if n and PER[unit] and tonumber(n) > 0 then
            l.rate = tonumber(n) / PER[unit]
            l.cap = math.max(1, l.rate)
          end
        elseif kind == 'conc' then
          l.conc = tonumber(raw[i + 1])
        end
      end
    end
    return lim
  end

  local buckets = {}
  local function bucket(l, fn)
    local b = buckets[fn]
    if not b then
      local raw = redis.call('HGET', P .. 'buckets', fn)
      local tokens, at = l.cap, now
      if raw then
        local t, a = string.match(raw, '^([^:]+):(.+)$')
        tokens, at = tonumber(t) or l.cap, tonumber(a) or now
      end
      b = {tokens = math.min(l.cap, tokens + math.max(0, now - at) * l.rate)}
      buckets[fn] = b
    end
    return b
  end

  room = function(lim, fn)
    local l = lim and fn and lim[fn]
    if not l then return math.huge, now end
    local n = math.huge
    if l.conc then
      n = l.conc - (tonumber(redis.call('HGET', P .. 'slots', fn)) or 0)
      if n <= 0 then return 0, '+inf' end
    end
    if l.rate then
      local b = bucket(l, fn)
      local whole = math.floor(b.tokens + 1e-9)
      if whole < 1 then return 0, now + (1 - b.tokens) / l.rate end
      n = math.min(n, whole)
    end
    return n, now
  end

  admit = function(lim, fn, tk)
    if room(lim, fn) < 1 then return false end
    local l = lim[fn]
    if l.rate then
      local b = buckets[fn]
      b.tokens = b.tokens - 1
      redis.call('HSET', P .. 'buckets', fn, b.tokens .. ':' .. now)
    end
    if l.conc then
      redis.call('HINCRBY', P .. 'slots', fn, 1)
      redis.call('HSET', tk, 'slot', fn)
    end
    return true
  end

  local held = {}
  hold = function(fn, id)
    local ids = held[fn]
    if not ids then
      ids = {}
      held[fn] = ids
    end
    ids[#ids + 1] = id
  end

  hold_flush = function(lim)
    for fn, ids in pairs(held) do
      for i = 1, #ids, 1000 do redis.call('RPUSH', P .. 'queue:f:' .. fn, unpack(ids, i, math.min(i + 999, #ids))) end
      local _, due = room(lim, fn)
      redis.call('ZADD', P .. 'throttled', due, fn)
    end
    held = {}
  end

  free_slot = function(fn)
    if redis.call('HINCRBY', P .. 'slots', fn, -1) <= 0 then redis.call('HDEL', P .. 'slots', fn) end
    if redis.call('ZADD', P .. 'throttled', 'XX', 'LT', 'CH', now, fn) == 1 then return 1 end
    return 0
  end
end
