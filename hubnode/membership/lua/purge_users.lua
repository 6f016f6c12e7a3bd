-- One bounded step of taking a node's connections out of the online counts.
-- KEYS: nodes, node users, online. ARGV: node, cursor, count, mode, now ms.
-- Each user moved is removed from the node's index in the same step, so two
-- sweepers racing can never decrement one count twice. Returns the next
-- cursor ('0': done), or -1 when a swept node turned out to be alive.
local node, cursor, count, mode, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not may_purge(KEYS[1], node, mode, now) then return -1 end
local page = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', count)
local users = page[2]
for i = 1, #users, 2 do
  decr_field(KEYS[3], users[i], tonumber(users[i + 1]))
  redis.call('HDEL', KEYS[2], users[i])
end
return page[1]
