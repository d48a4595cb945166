#!lua flags=no-writes
-- Reads one leaderboard's top (server/money/boards.py): at most n entries, highest first,
-- ties by user id, each with the name kept beside the board. Writes nothing.
-- KEYS: the board (a zset), its names hash (same slot). ARGV: n.
-- Reply: flat {user, coins, name JSON text or false, ...}.
local n = int_arg(1, 1, 100)
local flat = {}
for _, entry in ipairs(board_top(KEYS[1], KEYS[2], n)) do
  flat[#flat + 1] = entry[1]
  flat[#flat + 1] = entry[2]
  flat[#flat + 1] = entry[3]
end
return flat
