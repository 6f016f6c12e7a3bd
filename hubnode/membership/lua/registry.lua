-- The registry index's own step (hub:nodes slot). KEYS: nodes.
-- ARGV: op ('claim' | 'drop'), node, bound ms. Acts only while the node's
-- score is at most `bound` (the sweeper's "now"), so a node that re-registered
-- meanwhile keeps its entry. 'claim': score 0 ("claimed by a sweep"), returns
-- 1. 'drop': removes the entry, returns 1 if this call removed it.
local op, node, bound = ARGV[1], ARGV[2], tonumber(ARGV[3])
local score = tonumber(redis.call('ZSCORE', KEYS[1], node))
if score == nil or score > bound then return 0 end
if op == 'claim' then
  if score > 0 then redis.call('ZADD', KEYS[1], 0, node) end
  return 1
end
return redis.call('ZREM', KEYS[1], node)
