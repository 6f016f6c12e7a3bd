-- One batch of a re-registration: the node's connections (node slot, before
-- the users' online hashes). KEYS: node hash, node conns, node users.
-- ARGV: expiry ms, JSON array of [conn, user ('' = anonymous)].
-- Returns -1 if the node was claimed by a sweep or lost meanwhile (start
-- over). Each batch renews the expiry, so a long re-registration is never
-- swept while it runs.
if not may_purge(KEYS[1], 'reset', ARGV[1]) then return -1 end
for _, c in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('SADD', KEYS[2], c[1]) == 1 and c[2] ~= '' then
    redis.call('HINCRBY', KEYS[3], c[2], 1)
  end
end
return 1
