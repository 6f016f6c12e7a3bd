-- One bounded step of removing a node's members from one room (sweep, drain,
-- re-registration). KEYS: nodes, members, rooms, node rooms.
-- ARGV: node, room, cursor, count, mode ('sweep' | 'self'), now ms.
-- HSCANs about `count` fields of the room from `cursor`, deletes the node's
-- ones and returns the next cursor ('0': the room is done, and leaves the
-- node's room index), or -1 when a swept node turned out to be alive.
-- A big room is thus cleaned in many short scripts instead of one long one
-- that would stall Redis for every client of the cluster.
local node, room, cursor, count, mode, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not may_purge(KEYS[1], node, mode, now) then return -1 end
local page = redis.call('HSCAN', KEYS[2], cursor, 'MATCH', node .. ':*', 'COUNT', count)
local fields = page[2]
for i = 1, #fields, 2 do redis.call('HDEL', KEYS[2], fields[i]) end
room_count(KEYS[2], KEYS[3], room)
if page[1] == '0' then redis.call('SREM', KEYS[4], room) end
return page[1]
