-- A connection left a room. KEYS: nodes, members, rooms, node rooms.
-- ARGV: prefix, node, room, conn, emptied ('1': no local member left).
local prefix, node, room, conn, emptied = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not registered(prefix, node) then return -1 end
if redis.call('HDEL', KEYS[2], conn) == 1 then
  room_count(prefix, room)
end
if emptied == '1' then redis.call('SREM', KEYS[4], room) end
return 1
