-- One batch of a re-registration: rooms into the node's index (node slot,
-- before their members are written). KEYS: node hash, node rooms.
-- ARGV: expiry ms, then room names. Returns -1 if the node was claimed or lost meanwhile.
if not may_purge(KEYS[1], 'reset', ARGV[1]) then return -1 end
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
return 1
