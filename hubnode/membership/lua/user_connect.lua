-- A connection of a user opened: the user-slot step, after node_connect.lua.
-- KEYS: the user's online hash. ARGV: conn, node, limit (connections per user
-- cluster-wide, 0 = none). Returns 1 (recorded, or already there) or -2 (the
-- user is at the limit: nothing recorded; the caller undoes its node step).
-- The check and the record are one step, so concurrent handshakes of one user
-- on any number of nodes can never pass the limit together.
local conn, node, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HEXISTS', KEYS[1], conn) == 1 then return 1 end
if limit > 0 and redis.call('HLEN', KEYS[1]) >= limit then return -2 end
redis.call('HSET', KEYS[1], conn, node)
return 1
