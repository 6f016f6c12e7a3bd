-- The last node-slot step of removing a node. KEYS: node hash, node rooms, node users, node conns.
-- ARGV: mode ('sweep' | 'self' | 'reset'), stamp ms.
-- Returns 0 while the node still has rooms or users to purge (the caller
-- goes on), -1 when a swept node turned out alive, 1 when its entries are
-- gone. 'reset' (a re-registration) keeps the node's hash. The caller then
-- takes the node out of hub:nodes (registry.lua for a sweep, so that exactly
-- one of several racing sweepers reports it).
local mode, stamp = ARGV[1], ARGV[2]
if not may_purge(KEYS[1], mode, stamp) then return -1 end
-- A reset keeps the rooms index: the re-registration rewrites those rooms'
-- members, then drops the rooms the node has none left in.
if (mode ~= 'reset' and redis.call('SCARD', KEYS[2]) > 0) or redis.call('HLEN', KEYS[3]) > 0 then return 0 end
redis.call('DEL', KEYS[4])  -- emptied by purge_conns already
if mode == 'reset' then
  redis.call('HSET', KEYS[1], 'clients', 0)
  return 1
end
redis.call('DEL', KEYS[1])
return 1
