-- First step of (re-)registering a node: it is live again from here on, so a
-- sweep that is still going through its old entries stops at its next step.
-- KEYS: nodes, node hash. ARGV: node, expiry ms, info (JSON object of node hash fields).
local node = ARGV[1]
redis.call('ZADD', KEYS[1], ARGV[2], node)
for field, value in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[2], field, value) end
return 1
