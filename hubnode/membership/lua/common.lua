-- Helpers prepended to every membership script (docs/redis.md).
-- Every key a script touches arrives in KEYS, built by publisher/keys.py, and
-- all of them hash to one Redis Cluster slot: a node's keys share the slot of
-- {<node id>}, a room's of {<room>}, a user's of {<user id>}; the registry
-- index (hub:nodes) is only written by scripts of its own. No script builds a
-- key name. Counts are floored at zero, so they never go negative.

local function decr_field(key, field, by)
  local n = redis.call('HINCRBY', key, field, -by)
  if n <= 0 then redis.call('HDEL', key, field) end
end

-- The `expiry` field (ms) of a node's hash is what every node-slot script
-- checks; 0 means "claimed by a sweep": the node's hub:nodes entry still
-- lists it, so any live node finishes the sweep if the first sweeper dies,
-- but it is no longer registered, so the node's own next heartbeat or update
-- finds itself gone and re-registers everything (a sweep cut short by the node
-- coming back can never leave it half-deleted without it noticing). A missing
-- hash (swept, or Redis lost its data) is not registered either.
local function registered(node_key)
  local expiry = tonumber(redis.call('HGET', node_key, 'expiry'))
  return expiry ~= nil and expiry > 0
end

-- The guard of every node-slot step that removes a node's entries; `stamp` is a time in ms.
-- 'claim' (the first step of a sweep) and 'sweep' (every later one): only
-- while the node is still expired at `stamp`, and the step claims it (expiry
-- 0). A node that came back stops the sweep; if it stops a 'sweep' step, the
-- sweep may have deleted entries of its room or user hashes after the node
-- re-added them (those steps cannot be guarded: they live in other slots), so
-- the node is told to re-register (`resync`, read by heartbeat.lua).
-- 'reset' (clearing its own entries before re-registering, and each
-- re-registration batch): only while the node is still registered, and each
-- step renews its expiry to `stamp`. 'self' (drain): always.
local function may_purge(node_key, mode, stamp)
  if mode == 'self' then return true end
  local expiry = tonumber(redis.call('HGET', node_key, 'expiry'))
  if mode == 'reset' then
    if expiry == nil or expiry <= 0 then return false end
    if tonumber(stamp) > expiry then redis.call('HSET', node_key, 'expiry', stamp) end
    return true
  end
  if expiry == nil then return true end  -- gone already: another sweeper finished its hash
  if expiry > tonumber(stamp) then
    if mode == 'sweep' then redis.call('HSET', node_key, 'resync', 1) end
    return false
  end
  if expiry > 0 then redis.call('HSET', node_key, 'expiry', 0) end
  return true
end

-- Presence (docs/protocol.md). A room's presence hash counts each
-- user's connections in the room, and only the scripts that write its members
-- hash change it, in the same step: so the step that adds a user's first
-- member (or removes the last) knows it, and announces it there and then,
-- exactly once cluster-wide. The scripts that write members take these seven
-- arguments first: announce ('1': the room is one of --presence-rooms),
-- the room's channel, sharded ('1': SPUBLISH, on a Redis Cluster), origin
-- (the node), an envelope id base (unique per call: the events are
-- <base>.<n>), the time (Unix s) and the room. Anonymous members ('') are
-- counted by nobody and announce nothing.
local function event_args()
  return {announce = ARGV[1] == '1', channel = ARGV[2], publish = ARGV[3] == '1' and 'SPUBLISH' or 'PUBLISH',
          origin = ARGV[4], base = ARGV[5], ts = tonumber(ARGV[6]), room = ARGV[7], sent = 0}
end
local EVENT_ARGS = 7

local function announce(ev, event, user)
  if not ev.announce then return end
  ev.sent = ev.sent + 1
  redis.call(ev.publish, ev.channel, cmsgpack.pack({
    v = 1, id = ev.base .. '.' .. ev.sent, origin = ev.origin,
    msg = {type = 'presence', room = ev.room, timestamp = ev.ts, data = {event = event, user_id = user}}}))
end

-- Add a member unless it is there; returns 1 if added. KEYS of the caller: members, presence.
local function add_member(ev, members, presence, conn, user)
  if redis.call('HSETNX', members, conn, user) == 0 then return 0 end
  if user ~= '' and redis.call('HINCRBY', presence, user, 1) == 1 then announce(ev, 'join', user) end
  return 1
end

-- Remove a member if it is there; returns 1 if removed.
local function remove_member(ev, members, presence, conn)
  local user = redis.call('HGET', members, conn)
  if not user then return 0 end
  redis.call('HDEL', members, conn)
  if user ~= '' and redis.call('HINCRBY', presence, user, -1) <= 0 then
    redis.call('HDEL', presence, user)
    announce(ev, 'leave', user)
  end
  return 1
end
