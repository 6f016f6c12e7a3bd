-- A draining node removes its own entries (PROTOCOL.md section 8). ARGV: prefix, node.
remove_node(ARGV[1], ARGV[2])
return 1
