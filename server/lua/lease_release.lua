#!lua flags=allow-oom
-- Gives a lease up only while it still holds our token, so a waiting process takes over at
-- once. allow-oom, as lease_renew.lua: DEL frees memory.
-- KEYS: the lease. ARGV: token.
-- Reply: 1 released, 0 not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
