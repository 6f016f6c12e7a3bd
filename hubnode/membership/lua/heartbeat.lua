-- Renew a node's liveness (node slot). KEYS: node hash. ARGV: expiry ms, now ms.
-- Returns 0 when the node must re-register everything: it is not registered
-- (claimed by a sweep, swept, or Redis lost its data), or a sweep that it
-- stopped by coming back asked for it (`resync`, see may_purge). The caller
-- then sets its hub:nodes score with a ZADD of its own.
if not registered(KEYS[1]) then return 0 end
if redis.call('HDEL', KEYS[1], 'resync') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'expiry', ARGV[1], 'heartbeat_at', ARGV[2])
return 1
