-- A connection closed: the node-slot step, last (after its members and online
-- entries are deleted, so the node's indexes stay supersets of them).
-- KEYS: node hash, node conns, node users, node rooms.
-- ARGV: conn, user ('' = anonymous), then the rooms where the node has no member left.
-- Also undoes node_connect.lua for a connection refused by the per-user limit.
-- Idempotent: the counts move only if the conns set still held the connection.
local conn, user = ARGV[1], ARGV[2]
if not registered(KEYS[1]) then return -1 end
for i = 3, #ARGV do redis.call('SREM', KEYS[4], ARGV[i]) end
if redis.call('SREM', KEYS[2], conn) == 0 then return 1 end
if redis.call('HINCRBY', KEYS[1], 'clients', -1) < 0 then
  redis.call('HSET', KEYS[1], 'clients', 0)
end
if user ~= '' and tonumber(redis.call('HGET', KEYS[3], user) or '0') > 0 then
  decr_field(KEYS[3], user, 1)
end
return 1
