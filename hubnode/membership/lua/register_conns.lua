-- One batch of a re-registration: count connections. KEYS: nodes, node conns,
-- node users, online. ARGV: node, JSON array of [conn, user ('' = anonymous)].
-- Returns -1 if the node's entry vanished meanwhile (start over).
local node = ARGV[1]
if not registered(KEYS[1], node) then return -1 end
for _, c in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('SADD', KEYS[2], c[1]) == 1 and c[2] ~= '' then
    redis.call('HINCRBY', KEYS[3], c[2], 1)
    redis.call('HINCRBY', KEYS[4], c[2], 1)
  end
end
return 1
