-- One bounded step of emptying a node's connection set (instead of deleting
-- a set of 100,000 members in one command). KEYS: node hash, node conns.
-- ARGV: mode, stamp ms, cursor, count. Returns the next cursor ('0': done),
-- or -1 when a swept node turned out to be alive. SSCAN and SREM, not SPOP:
-- random pops slow down as a big set empties.
local mode, stamp, cursor, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if not may_purge(KEYS[1], mode, stamp) then return -1 end
local page = redis.call('SSCAN', KEYS[2], cursor, 'COUNT', count)
if #page[2] > 0 then redis.call('SREM', KEYS[2], unpack(page[2])) end
return page[1]
