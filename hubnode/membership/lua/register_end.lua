-- Last step of a re-registration (node slot). KEYS: node hash, node conns.
-- ARGV: expiry ms, now ms. Returns the node's connection count, -1 if it was
-- claimed or lost meanwhile. The caller then sets its hub:nodes score.
if not registered(KEYS[1]) then return -1 end
local clients = redis.call('SCARD', KEYS[2])
redis.call('HSET', KEYS[1], 'clients', clients, 'heartbeat_at', ARGV[2], 'expiry', ARGV[1])
return clients
