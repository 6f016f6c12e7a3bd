-- One guarded step of removing a node's rooms or users (sweep, drain,
-- re-registration). KEYS: node hash, node index (rooms SET or users HASH).
-- ARGV: mode ('claim' | 'sweep' | 'self' | 'reset', see may_purge), stamp ms,
-- kind ('set' | 'hash'), cursor, count, then the names whose members (or
-- online entries) are gone now. Removes those names from the index, then
-- reads the next page of it from `cursor` (SSCAN or HSCAN, about `count`
-- names; none when count is 0) and answers {next cursor, names}, or -1 when
-- a swept node turned out to be alive (or a re-registering one was claimed).
-- Every round of deletions in the other slots comes right after such a
-- guarded step. A cursor, not random picks: sampling a big index that is
-- being emptied gets slower with every name removed.
local mode, stamp, kind, cursor, count = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if not may_purge(KEYS[1], mode, stamp) then return -1 end
local drop = kind == 'set' and 'SREM' or 'HDEL'
for i = 6, #ARGV do redis.call(drop, KEYS[2], ARGV[i]) end
if count <= 0 then return {cursor, {}} end
if kind == 'set' then return redis.call('SSCAN', KEYS[2], cursor, 'COUNT', count) end
local page = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', count)
local names = {}
for i = 1, #page[2], 2 do names[#names + 1] = page[2][i] end
return {page[1], names}
