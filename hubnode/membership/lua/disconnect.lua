-- A connection closed. KEYS: nodes, node hash, node users, online, node rooms, node conns,
-- then the members key of each room. ARGV: prefix, node, conn, user, n, rooms[1..n],
-- emptied[1..n] ('1' when the node has no member left in that room).
-- Idempotent: the counts move only if the conns set still held the connection.
local prefix, node, conn, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not registered(prefix, node) then return -1 end
local n = tonumber(ARGV[5])
for i = 1, n do
  local room = ARGV[5 + i]
  redis.call('HDEL', KEYS[6 + i], conn)
  room_count(prefix, room)
  if ARGV[5 + n + i] == '1' then redis.call('SREM', KEYS[5], room) end
end
if redis.call('SREM', KEYS[6], conn) == 0 then return 1 end
if redis.call('HINCRBY', KEYS[2], 'clients', -1) < 0 then
  redis.call('HSET', KEYS[2], 'clients', 0)
end
if user ~= '' and tonumber(redis.call('HGET', KEYS[3], user) or '0') > 0 then
  decr_field(KEYS[3], user, 1)
  decr_field(KEYS[4], user, 1)
end
return 1
