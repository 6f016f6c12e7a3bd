-- Remove a dead node's entries, if it is still expired when this runs (several
-- sweepers may race; the check and the removal are one atomic step).
-- KEYS: nodes. ARGV: prefix, sweeping node, dead node, now ms.
-- Returns 1 when this call swept it.
local prefix, node, now = ARGV[1], ARGV[3], tonumber(ARGV[4])
local expiry = registered(prefix, node)
if expiry and tonumber(expiry) > now then return 0 end
remove_node(prefix, node)
if expiry then return 1 end
return 0
