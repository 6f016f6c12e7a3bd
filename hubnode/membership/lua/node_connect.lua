-- A connection opened: the node-slot step, first. KEYS: node hash, node conns, node users.
-- ARGV: conn, user ('' = anonymous).
-- Returns -1 (node not registered: re-register), 1 (counted now), 2 (counted
-- before, e.g. by a re-registration). Idempotent: the node's conns set
-- decides whether the counts move. The user's online hash (user_connect.lua)
-- comes after, so the node's users index is always a superset of it.
local conn, user = ARGV[1], ARGV[2]
if not registered(KEYS[1]) then return -1 end
if redis.call('SADD', KEYS[2], conn) == 0 then return 2 end
redis.call('HINCRBY', KEYS[1], 'clients', 1)
if user ~= '' then redis.call('HINCRBY', KEYS[3], user, 1) end
return 1
