-- The node's last member left a room: the node-slot step, after the member is
-- deleted. KEYS: node hash, node rooms. ARGV: room.
if not registered(KEYS[1]) then return -1 end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
