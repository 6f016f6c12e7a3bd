-- A connection opened. KEYS: nodes, node hash, node users, online.
-- ARGV: prefix, node, user ('' = anonymous). Returns -1 if the node is not registered.
local prefix, node, user = ARGV[1], ARGV[2], ARGV[3]
if not registered(prefix, node) then return -1 end
redis.call('HINCRBY', KEYS[2], 'clients', 1)
if user ~= '' then
  redis.call('HINCRBY', KEYS[3], user, 1)
  redis.call('HINCRBY', KEYS[4], user, 1)
end
return 1
