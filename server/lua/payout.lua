-- Turns a creator's diamonds into a payout once per key (keys are global and kept for good).
-- Checks: the key (same creator and diamonds replays the first result; anything else is
-- refused), the diamonds the creator has, the part of them past its hold (payable), the
-- day's payout cap. Then ledger entry, debit, the day's payouts, due held buckets dropped,
-- the record. Time and day are Redis's own (money_now).
-- KEYS: creator wallet, payout record, ledger, creator's held diamonds.
-- ARGV: event, payout id, creator, key, diamonds, cents, now ('' in production: Redis's
-- TIME), daily cap in diamonds.
-- Reply: {'ok', event, payout id, cents, diamonds left} or {refusal code, message}.
local wallet, payout_key, ledger, held_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local event, payout, creator, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local diamonds = int_arg(5, 1, 1e12)
local cents = int_arg(6, 0, 2^52)
local now = money_now(7)
local cap = int_arg(8, 1, 2^50)
local today = epoch_day(now)

local first = redis.call('HMGET', payout_key, 'creator', 'diamonds', 'event', 'payout', 'cents',
  'left')
if first[1] then
  if first[1] ~= creator or tonumber(first[2]) ~= diamonds then
    return {'key_reused', 'payout key ' .. key .. ' was already used for ' .. first[2] ..
      ' diamonds of ' .. first[1]}
  end
  return {'ok', first[3], first[4], tonumber(first[5]), tonumber(first[6])}
end
local balance = stored_int(wallet, 'diamonds')
if balance < diamonds then
  return {'insufficient_diamonds', string.format('a payout of %d diamonds; %s holds %d',
    diamonds, creator, balance)}
end
local held, due, next_day = held_buckets(held_key, today)
local payable = math.max(balance - held, 0)
if payable < diamonds then
  return {'payout_held', string.format('a payout of %d diamonds; %d of %s\'s %d diamonds ' ..
    'are payable now, %d are still on hold (the next become payable on %s, 00:00 UTC)',
    diamonds, payable, creator, balance, held, day_name(next_day or today + 1))}
end
local paid_today = stamped(wallet, 'payout_day', 'payout_day_diamonds', today)
if paid_today + diamonds > cap then
  return {'payout_cap', string.format('a payout of %d diamonds; payouts are capped at %d ' ..
    'diamonds per UTC day, %d were paid out today, so at most %d more until 00:00 UTC',
    diamonds, cap, paid_today, cap - math.min(paid_today, cap))}
end

append_ledger(ledger, 'event', event, 'kind', 'payout', 'ts', now, 'creator', creator,
  'key', key, 'payout', payout, 'diamonds', diamonds, 'cents', cents)
local left = redis.call('HINCRBY', wallet, 'diamonds', -diamonds)
redis.call('HSET', wallet, 'payout_day', today, 'payout_day_diamonds', paid_today + diamonds)
if #due > 0 then
  redis.call('HDEL', held_key, unpack(due))
end
redis.call('HSET', payout_key, 'creator', creator, 'diamonds', diamonds, 'event', event,
  'payout', payout, 'cents', cents, 'left', left, 'ts', now)
return {'ok', event, payout, cents, left}
