-- One bounded step of deleting a node's members from one room (room slot):
-- a sweep of a dead node, a drain, or the clearing before a re-registration.
-- KEYS: the room's members hash, its presence hash. ARGV: the seven event
-- arguments of common.lua, then node, cursor, count. HSCANs about `count`
-- fields from `cursor`, removes those of the node (conn ids are
-- "<node>:<n>"), announcing the leaves of users whose last connection in the
-- room that was, and returns the next cursor ('0': done). Unguarded, like
-- purge_hash.lua: the caller runs a guarded node-slot step before each round.
local ev = event_args()
local node, cursor, count = ARGV[EVENT_ARGS + 1], ARGV[EVENT_ARGS + 2], ARGV[EVENT_ARGS + 3]
local page = redis.call('HSCAN', KEYS[1], cursor, 'MATCH', node .. ':*', 'COUNT', count)
local fields = page[2]
for i = 1, #fields, 2 do remove_member(ev, KEYS[1], KEYS[2], fields[i]) end
return page[1]
