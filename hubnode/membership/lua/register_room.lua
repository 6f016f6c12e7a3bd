-- One batch of a re-registration: members of one room. KEYS: nodes, members,
-- rooms, node rooms. ARGV: node, room, JSON array of [conn, user], expiry ms.
-- Returns -1 if the node's entry vanished or was claimed meanwhile.
local node, room = ARGV[1], ARGV[2]
if not registered(KEYS[1], node) then return -1 end
redis.call('ZADD', KEYS[1], 'GT', ARGV[4], node)
for _, c in ipairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[2], c[1], c[2]) end
redis.call('SADD', KEYS[4], room)
room_count(KEYS[2], KEYS[3], room)
return 1
