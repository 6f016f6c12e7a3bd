-- (Re-)register a node with all its local members, replacing whatever it had.
-- KEYS: nodes, node hash. ARGV: prefix, node, expiry ms, info (JSON object of
-- node hash fields), snapshot (JSON array of [conn, user, [rooms...]]).
local prefix, node = ARGV[1], ARGV[2]
remove_node(prefix, node)
local node_key = KEYS[2]
local info = cjson.decode(ARGV[4])
for field, value in pairs(info) do redis.call('HSET', node_key, field, value) end
local conns = cjson.decode(ARGV[5])
redis.call('HSET', node_key, 'clients', #conns)
local touched = {}
for _, c in ipairs(conns) do
  local conn, user, rooms = c[1], c[2], c[3]
  redis.call('SADD', node_key .. ':conns', conn)
  if user ~= '' then
    redis.call('HINCRBY', node_key .. ':users', user, 1)
    redis.call('HINCRBY', prefix .. 'online', user, 1)
  end
  for _, room in ipairs(rooms) do
    redis.call('HSET', prefix .. 'members:{' .. room .. '}', conn, user)
    touched[room] = true
  end
end
for room, _ in pairs(touched) do
  redis.call('SADD', node_key .. ':rooms', room)
  room_count(prefix, room)
end
redis.call('ZADD', KEYS[1], ARGV[3], node)
return #conns
