-- Publish one envelope to a room's or user's channel, appending it to the
-- stream's history when the stream has history (docs/protocol.md).
--
-- KEYS[1] stream (STREAM), KEYS[2] meta (HASH), KEYS[3] ids (ZSET: envelope id -> offset of
--         the messages kept): built by publisher.keys.Keys, sharing the room's or user's hash
--         tag with the channel.
-- ARGV[1] channel, ARGV[2] envelope (a msgpack map), ARGV[3] envelope id,
-- ARGV[4] history size of this publisher for this stream (0: none of its own),
-- ARGV[5] history ttl in seconds, ARGV[6] a fresh epoch, used only when the
--         stream is created here, ARGV[7] '1' to publish with SPUBLISH (sharded
--         pub/sub on a Redis Cluster), else (or absent) PUBLISH.
-- Returns {receivers, offset, epoch}; offset 0 and epoch "" when the stream
-- has no history (then this was a plain PUBLISH).
--
-- A stream that exists is appended to whatever ARGV[4] says, so its offsets
-- never skip. The envelope gains two top-level fields, "offset" and "epoch":
-- the map header is rewritten (fixmap or map16) and the two pairs appended.
local payload = ARGV[2]
local publish = ARGV[7] == '1' and 'SPUBLISH' or 'PUBLISH'
local head = string.byte(payload, 1)
local count, body
if head and head >= 0x80 and head <= 0x8f then
  count, body = head - 0x80, string.sub(payload, 2)
elseif head == 0xde and #payload >= 3 then
  count, body = string.byte(payload, 2) * 256 + string.byte(payload, 3), string.sub(payload, 4)
else
  return redis.error_reply('ERR hubnode: the envelope must be a msgpack map')
end
if count + 2 > 65535 then  -- checked before any write: a script that fails halfway is not undone
  return redis.error_reply('ERR hubnode: the envelope has too many fields')
end
local size, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'size', 'ttl')
local epoch = meta[1]
if not epoch then
  if size <= 0 then
    return {redis.call(publish, ARGV[1], payload), 0, ''}
  end
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1], KEYS[3])  -- entries of a lost epoch must not be read as this one's
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0, 'size', size, 'ttl', ttl)
else
  local seen = ARGV[3] ~= '' and redis.call('ZSCORE', KEYS[3], ARGV[3])
  if seen then
    -- a publisher's retry of a message the stream keeps: it is stored and was
    -- published already (the script runs whole or not at all)
    return {0, tonumber(seen), epoch}
  end
  if size <= 0 then
    size, ttl = tonumber(meta[2]), tonumber(meta[3])
  elseif size ~= tonumber(meta[2]) or ttl ~= tonumber(meta[3]) then
    redis.call('HSET', KEYS[2], 'size', size, 'ttl', ttl)
  end
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
count = count + 2
if count <= 15 then
  body = string.char(0x80 + count) .. body
else
  body = string.char(0xde, math.floor(count / 256), count % 256) .. body
end
body = body .. cmsgpack.pack('offset', offset, 'epoch', epoch)
redis.call('XADD', KEYS[1], 'MAXLEN', size, offset .. '-1', 'p', body)
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], offset, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', offset - size)  -- ids of the messages kept, no more
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return {redis.call(publish, ARGV[1], body), offset, epoch}
