-- One batch of a re-registration: count connections. KEYS: nodes, node conns,
-- node users, online. ARGV: node, JSON array of [conn, user ('' = anonymous)],
-- expiry ms. Returns -1 if the node's entry vanished or was claimed by a sweep
-- meanwhile (start over). Each batch renews the expiry, so a long
-- re-registration is never swept while it runs.
local node = ARGV[1]
if not registered(KEYS[1], node) then return -1 end
redis.call('ZADD', KEYS[1], 'GT', ARGV[3], node)
for _, c in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('SADD', KEYS[2], c[1]) == 1 and c[2] ~= '' then
    redis.call('HINCRBY', KEYS[3], c[2], 1)
    redis.call('HINCRBY', KEYS[4], c[2], 1)
  end
end
return 1
