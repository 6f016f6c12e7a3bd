-- A connection opened. KEYS: nodes, node hash, node users, online, node conns.
-- ARGV: node, conn, user ('' = anonymous), limit (connections per user cluster-wide, 0 = none).
-- Returns 1 (counted), -1 (node not registered: re-register), -2 (the user is at the limit).
-- The limit check and the count are one step, so concurrent handshakes of one
-- user on any number of nodes can never pass it together.
-- Idempotent: the node's conns set decides whether the counts move, so a
-- connection already counted by a re-registration is not counted twice.
local node, conn, user, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if not registered(KEYS[1], node) then return -1 end
if redis.call('SISMEMBER', KEYS[5], conn) == 1 then return 1 end
if user ~= '' and limit > 0 and tonumber(redis.call('HGET', KEYS[4], user) or '0') >= limit then
  return -2
end
redis.call('SADD', KEYS[5], conn)
redis.call('HINCRBY', KEYS[2], 'clients', 1)
if user ~= '' then
  redis.call('HINCRBY', KEYS[3], user, 1)
  redis.call('HINCRBY', KEYS[4], user, 1)
end
return 1
