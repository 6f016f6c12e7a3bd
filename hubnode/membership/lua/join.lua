-- A connection joined a room. KEYS: nodes, members, rooms, node rooms, node conns.
-- ARGV: node, room, conn, user. A connection that is already gone is not added.
local node, room, conn, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not registered(KEYS[1], node) then return -1 end
if redis.call('SISMEMBER', KEYS[5], conn) == 0 then return 1 end
if redis.call('HSETNX', KEYS[2], conn, user) == 1 then
  room_count(KEYS[2], KEYS[3], room)
end
redis.call('SADD', KEYS[4], room)
return 1
