-- Helpers prepended to every membership script (PROTOCOL.md section 7).
-- Every key a script touches arrives in KEYS, built by publisher/keys.py: no
-- script builds a key name of its own. Counts are derived from the hashes
-- they count (HLEN) or floored at zero, so they never go negative.

-- hub:rooms[room] = HLEN of the room's members hash, removed at 0.
local function room_count(members, rooms, room)
  local n = redis.call('HLEN', members)
  if n == 0 then
    redis.call('HDEL', rooms, room)
  else
    redis.call('HSET', rooms, room, n)
  end
end

local function decr_field(key, field, by)
  local n = redis.call('HINCRBY', key, field, -by)
  if n <= 0 then redis.call('HDEL', key, field) end
end

local function registered(nodes, node)
  return redis.call('ZSCORE', nodes, node)
end

-- The guard of every step that removes a node's entries. mode 'sweep': only
-- while the node is still expired at `now` (it may have come back: then stop);
-- 'self': the node removes its own entries, always allowed.
local function may_purge(nodes, node, mode, now)
  if mode ~= 'sweep' then return true end
  local expiry = registered(nodes, node)
  return not expiry or tonumber(expiry) <= tonumber(now)
end
