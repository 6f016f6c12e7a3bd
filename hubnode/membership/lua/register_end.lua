-- Last step of a re-registration. KEYS: nodes, node hash, node conns.
-- ARGV: node, expiry ms, now ms. Returns the node's connection count, -1 if its entry vanished.
local node = ARGV[1]
if not registered(KEYS[1], node) then return -1 end
local clients = redis.call('SCARD', KEYS[3])
redis.call('HSET', KEYS[2], 'clients', clients, 'heartbeat_at', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], node)
return clients
