-- Members join a room (room slot): a join, or a batch of a re-registration.
-- KEYS: the room's members hash, its presence hash. ARGV: the seven event
-- arguments of common.lua, then pairs of conn, user ('' = anonymous).
-- A member already there is left alone (so the step is safe to repeat).
-- Returns how many members were added.
local ev = event_args()
local added = 0
for i = EVENT_ARGS + 1, #ARGV, 2 do
  added = added + add_member(ev, KEYS[1], KEYS[2], ARGV[i], ARGV[i + 1])
end
return added
