-- Helpers prepended to every membership script. Key names follow
-- PROTOCOL.md section 7; `prefix` is --key-prefix. Counts are derived from the
-- hashes they count (HLEN) or floored at zero, so they never go negative.

local function room_count(prefix, room)
  local members = prefix .. 'members:{' .. room .. '}'
  local n = redis.call('HLEN', members)
  if n == 0 then
    redis.call('HDEL', prefix .. 'rooms', room)
  else
    redis.call('HSET', prefix .. 'rooms', room, n)
  end
end

local function decr_field(key, field, by)
  local n = redis.call('HINCRBY', key, field, -by)
  if n <= 0 then redis.call('HDEL', key, field) end
end

-- Remove every entry of one node: its members in every room it had, its
-- users' online counts, its own keys. Safe to run twice.
local function remove_node(prefix, node)
  local node_key = prefix .. 'node:' .. node
  local node_rooms = node_key .. ':rooms'
  local node_users = node_key .. ':users'
  local pattern = node .. ':*'
  for _, room in ipairs(redis.call('SMEMBERS', node_rooms)) do
    local members = prefix .. 'members:{' .. room .. '}'
    local cursor = '0'
    repeat
      local page = redis.call('HSCAN', members, cursor, 'MATCH', pattern, 'COUNT', 1000)
      cursor = page[1]
      local fields = page[2]
      for i = 1, #fields, 2 do redis.call('HDEL', members, fields[i]) end
    until cursor == '0'
    room_count(prefix, room)
  end
  local users = redis.call('HGETALL', node_users)
  for i = 1, #users, 2 do
    decr_field(prefix .. 'online', users[i], tonumber(users[i + 1]))
  end
  redis.call('DEL', node_rooms, node_users, node_key .. ':conns', node_key)
  redis.call('ZREM', prefix .. 'nodes', node)
end

local function registered(prefix, node)
  return redis.call('ZSCORE', prefix .. 'nodes', node)
end
