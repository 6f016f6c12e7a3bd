-- Renew a node's liveness. KEYS: nodes, node hash. ARGV: node, expiry ms, now ms.
-- Returns 0 when the node's entry was gone (swept, or Redis lost its data):
-- the node must then re-register everything.
local node = ARGV[1]
if not registered(KEYS[1], node) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], node)
redis.call('HSET', KEYS[2], 'heartbeat_at', ARGV[3])
return 1
