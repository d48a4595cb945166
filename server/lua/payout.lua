-- Turns a creator's diamonds into a payout once per key (keys are global and kept for good).
-- Checks: the key (same creator and diamonds replays the first result; anything else is
-- refused), the diamonds held. Then ledger entry, debit, the record.
-- Reply: {'ok', event, payout id, cents, diamonds left} or {refusal code, message}.
local wallet, payout_key, ledger = KEYS[1], KEYS[2], KEYS[3]
local event, payout, creator, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local diamonds = int_arg(5, 1, 1e12)
local cents = int_arg(6, 0, 2^52)
local now = int_arg(7, 0, 2^50)

local first = redis.call('HMGET', payout_key, 'creator', 'diamonds', 'event', 'payout', 'cents',
  'left')
if first[1] then
  if first[1] ~= creator or tonumber(first[2]) ~= diamonds then
    return {'key_reused', 'payout key ' .. key .. ' was already used for ' .. first[2] ..
      ' diamonds of ' .. first[1]}
  end
  return {'ok', first[3], first[4], tonumber(first[5]), tonumber(first[6])}
end
local held = stored_int(wallet, 'diamonds')
if held < diamonds then
  return {'insufficient_diamonds', string.format('a payout of %d diamonds; %s holds %d',
    diamonds, creator, held)}
end

append_ledger(ledger, 'event', event, 'kind', 'payout', 'ts', now, 'creator', creator,
  'key', key, 'payout', payout, 'diamonds', diamonds, 'cents', cents)
local left = redis.call('HINCRBY', wallet, 'diamonds', -diamonds)
redis.call('HSET', payout_key, 'creator', creator, 'diamonds', diamonds, 'event', event,
  'payout', payout, 'cents', cents, 'left', left, 'ts', now)
return {'ok', event, payout, cents, left}
