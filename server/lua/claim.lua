-- Claims a global id (a purchase's receipt, a payout's key) for one owner and one set of
-- params, on a Redis Cluster only: the id's record then sits in its owner's partition, where
-- a record alone could not stop the same id being used again for another owner.
-- KEYS: the claim (giftstream:{pRR}:receipt_claim:RC or ...:payout_claim:IK).
-- ARGV: owner, params (what must match on a retry), now ('' in production: Redis's TIME).
-- Reply: {'ok', 'new'} (claimed now), {'ok', 'again'} (a retry: same owner and params; the
-- claim is touched, a write, so the WAIT the caller sends next on this connection covers the
-- claim whoever wrote it), or {'taken', owner, params} of the first claim (nothing written).
local claim = KEYS[1]
local owner, params = ARGV[1], ARGV[2]
local now = money_now(3)

local first = redis.call('HMGET', claim, 'owner', 'params')
if first[1] then
  if first[1] ~= owner or first[2] ~= params then
    return {'taken', first[1], first[2] or ''}
  end
  redis.call('HINCRBY', claim, 'retries', 1)
  return {'ok', 'again'}
end
redis.call('HSET', claim, 'owner', owner, 'params', params, 'ts', now)
return {'ok', 'new'}
