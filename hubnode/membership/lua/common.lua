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

-- A node's hub:nodes score is its expiry (ms); 0 means "claimed by a sweep":
-- still listed, so any live node finishes the sweep if the first sweeper dies,
-- but no longer registered, so the node's own next heartbeat or update finds
-- itself gone and re-registers everything (a sweep cut short by the node
-- coming back can never leave it half-deleted without it noticing).
local function registered(nodes, node)
  local expiry = redis.call('ZSCORE', nodes, node)
  return expiry and tonumber(expiry) > 0
end

-- The guard of every step that removes a node's entries; `stamp` is a time in ms.
-- 'sweep': only while the node is still expired at `stamp` (it may have come
-- back: then stop), and the first such step claims it. 'reset' (clearing its
-- own entries before re-registering): only while the node is still registered,
-- and each step renews its expiry to `stamp`. 'self' (drain): always.
local function may_purge(nodes, node, mode, stamp)
  if mode == 'self' then return true end
  if mode == 'reset' then
    if not registered(nodes, node) then return false end
    redis.call('ZADD', nodes, 'GT', stamp, node)
    return true
  end
  local now = stamp
  local expiry = redis.call('ZSCORE', nodes, node)
  if not expiry then return true end
  if tonumber(expiry) > tonumber(now) then return false end
  if tonumber(expiry) > 0 then redis.call('ZADD', nodes, 0, node) end
  return true
end
