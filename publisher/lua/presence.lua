-- Who is in a room (docs/protocol.md), read in one step so the numbers agree.
-- KEYS[1] the room's presence hash (user id -> connections in the room),
-- KEYS[2] its members hash (conn id -> user id, '' for anonymous): one slot.
-- Returns {flat HGETALL of the presence hash, HLEN of the members hash};
-- the caller counts the anonymous connections as HLEN minus the sum.
return {redis.call('HGETALL', KEYS[1]), redis.call('HLEN', KEYS[2])}
