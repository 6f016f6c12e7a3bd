-- The last step of removing a node. KEYS: nodes, node hash, node rooms, node users, node conns.
-- ARGV: node, mode ('sweep' | 'self' | 'reset'), now ms.
-- Returns 0 while the node still has rooms or users to purge (the caller
-- goes on), -1 when a swept node turned out alive, 1 when its entries are
-- gone; for 'sweep', 2 when this call removed the node from the registry
-- (so exactly one of several racing sweepers reports it). 'reset' (a
-- re-registration) keeps the node's registry entry and hash.
local node, mode, now = ARGV[1], ARGV[2], ARGV[3]
if not may_purge(KEYS[1], node, mode, now) then return -1 end
if redis.call('SCARD', KEYS[3]) > 0 or redis.call('HLEN', KEYS[4]) > 0 then return 0 end
redis.call('DEL', KEYS[5])  -- emptied by purge_conns already
if mode == 'reset' then
  redis.call('HSET', KEYS[2], 'clients', 0)
  return 1
end
redis.call('DEL', KEYS[2])
if redis.call('ZREM', KEYS[1], node) == 1 and mode == 'sweep' then return 2 end
return 1
