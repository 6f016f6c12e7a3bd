-- One bounded step of deleting a node's connections from one user's online
-- hash (user slot; a room's members go through purge_members.lua, which keeps
-- presence in step). KEYS: the hash.
-- ARGV: node, cursor, count. HSCANs about `count` fields from `cursor`,
-- deletes those of the node (conn ids are "<node>:<n>") and returns the next
-- cursor ('0': done). A big room is thus cleaned in many short scripts
-- instead of one long one that would stall Redis for every client. No guard
-- is possible here (the node's keys live in another slot): the caller runs a
-- guarded node-slot step (purge_next.lua) right before each round of these.
local node, cursor, count = ARGV[1], ARGV[2], ARGV[3]
local page = redis.call('HSCAN', KEYS[1], cursor, 'MATCH', node .. ':*', 'COUNT', count)
local fields = page[2]
for i = 1, #fields, 2 do redis.call('HDEL', KEYS[1], fields[i]) end
return page[1]
