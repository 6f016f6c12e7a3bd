-- A connection joins a room: the node-slot step, before the member is written.
-- KEYS: node hash, node conns, node rooms. ARGV: conn, room.
-- Returns -1 (not registered), 0 (the connection is gone: write no member),
-- 1 (the room is in the node's index: write the member).
local conn, room = ARGV[1], ARGV[2]
if not registered(KEYS[1]) then return -1 end
if redis.call('SISMEMBER', KEYS[2], conn) == 0 then return 0 end
redis.call('SADD', KEYS[3], room)
return 1
