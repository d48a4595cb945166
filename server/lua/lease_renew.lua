#!lua flags=allow-oom
-- Extends a lease only while it still holds our token, so a holder that lost it never
-- touches the next holder's lease. allow-oom: a full Redis must not cost the holder its
-- lease; GET and PEXPIRE take no memory, and ran at OOM when this script had no shebang.
-- KEYS: the lease. ARGV: token, ttl ms.
-- Reply: 1 renewed, 0 not ours (lost or expired).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
