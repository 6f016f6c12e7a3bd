-- A connection opened. KEYS: nodes, node hash, node users, online, node conns.
-- ARGV: prefix, node, conn, user ('' = anonymous). Returns -1 if the node is not registered.
-- Idempotent: the node's conns set decides whether the counts move, so a
-- connection already counted by a re-registration is not counted twice.
local prefix, node, conn, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not registered(prefix, node) then return -1 end
if redis.call('SADD', KEYS[5], conn) == 0 then return 1 end
redis.call('HINCRBY', KEYS[2], 'clients', 1)
if user ~= '' then
  redis.call('HINCRBY', KEYS[3], user, 1)
  redis.call('HINCRBY', KEYS[4], user, 1)
end
return 1
