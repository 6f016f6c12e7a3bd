-- Read a room's or user's stream (docs/protocol.md): its position and
-- the entries above an offset, in one atomic step.
--
-- KEYS[1] stream (STREAM), KEYS[2] meta (HASH), KEYS[3] ids (ZSET), as for publish.lua.
-- ARGV[1] since: return entries with offset > since (-1: none, only the position)
-- ARGV[2] limit: at most this many entries (0: no limit)
-- ARGV[3] create: "1" creates the stream's epoch (offset 0) when it has none,
--         with ARGV[4] the fresh epoch, ARGV[5] size, ARGV[6] ttl
-- Returns {epoch or false, top offset, entries kept, {envelope, ...}}.
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'offset')
local epoch, top = meta[1], tonumber(meta[2])
if not epoch then
  if ARGV[3] ~= '1' then
    return {false, 0, 0, {}}
  end
  epoch, top = ARGV[4], 0
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0, 'size', ARGV[5], 'ttl', ARGV[6])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
  return {epoch, 0, 0, {}}
end
local kept = redis.call('XLEN', KEYS[1])
local since = tonumber(ARGV[1])
local out = {}
if since >= 0 and since < top then
  local entries
  if tonumber(ARGV[2]) > 0 then
    entries = redis.call('XRANGE', KEYS[1], (since + 1) .. '-0', '+', 'COUNT', tonumber(ARGV[2]))
  else
    entries = redis.call('XRANGE', KEYS[1], (since + 1) .. '-0', '+')
  end
  for i, entry in ipairs(entries) do
    out[i] = entry[2][2]
  end
end
return {epoch, top, kept, out}
