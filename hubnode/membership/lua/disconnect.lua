-- A connection closed. KEYS: nodes, node hash, node users, online, node rooms, node conns,
-- rooms, then the members key of each room. ARGV: node, conn, user, n, rooms[1..n],
-- emptied[1..n] ('1' when the node has no member left in that room).
-- Idempotent: the counts move only if the conns set still held the connection.
local node, conn, user = ARGV[1], ARGV[2], ARGV[3]
if not registered(KEYS[1], node) then return -1 end
local n = tonumber(ARGV[4])
for i = 1, n do
  local room = ARGV[4 + i]
  redis.call('HDEL', KEYS[7 + i], conn)
  room_count(KEYS[7 + i], KEYS[7], room)
  if ARGV[4 + n + i] == '1' then redis.call('SREM', KEYS[5], room) end
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
