-- One bounded step of emptying a node's connection set (instead of deleting
-- a set of 100,000 members in one command). KEYS: nodes, node conns.
-- ARGV: node, count, mode, now ms. Returns how many remain, or -1 when a
-- swept node turned out to be alive.
local node, count, mode, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not may_purge(KEYS[1], node, mode, now) then return -1 end
redis.call('SPOP', KEYS[2], count)
return redis.call('SCARD', KEYS[2])
