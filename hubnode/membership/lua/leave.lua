-- A connection left a room. KEYS: nodes, members, rooms, node rooms.
-- ARGV: node, room, conn, emptied ('1': no local member left).
local node, room, conn, emptied = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not registered(KEYS[1], node) then return -1 end
if redis.call('HDEL', KEYS[2], conn) == 1 then
  room_count(KEYS[2], KEYS[3], room)
end
if emptied == '1' then redis.call('SREM', KEYS[4], room) end
return 1
