-- Members leave a room (room slot): a leave, or a connection's rooms on disconnect.
-- KEYS: the room's members hash, its presence hash. ARGV: the seven event
-- arguments of common.lua, then conn ids. Returns how many were removed.
local ev = event_args()
local removed = 0
for i = EVENT_ARGS + 1, #ARGV do
  removed = removed + remove_member(ev, KEYS[1], KEYS[2], ARGV[i])
end
return removed
