-- First step of (re-)registering a node (node slot): it is live again from
-- here on, so a sweep still going through its old entries stops at its next
-- guarded step. KEYS: node hash. ARGV: expiry ms, info (JSON object of node
-- hash fields). The caller then sets its hub:nodes score with a ZADD.
for field, value in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], field, value) end
redis.call('HSET', KEYS[1], 'expiry', ARGV[1])
redis.call('HDEL', KEYS[1], 'resync')  -- this registration rebuilds everything anyway
return 1
