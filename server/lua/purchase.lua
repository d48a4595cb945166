-- Credits a purchased package once per receipt. Checks: the receipt (a replay changes nothing;
-- another user or package is refused), age, the balance cap. Then ledger entry, the debt paid
-- down first, the rest credited, the receipt kept for good (a refund must find it).
-- Reply: {'ok', event of the crediting, coins now, coins credited, debt repaid, debt now}
-- or {refusal code, message}.
local wallet, receipt_key, ledger = KEYS[1], KEYS[2], KEYS[3]
local event, user, receipt, package, currency = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local coins = int_arg(6, 1, 1e9)
local price_cents = int_arg(7, 0, 1e12)
local adult = int_arg(8, 0, 1)
local now = money_now(9)  -- '' in production: Redis's TIME
local max_balance = int_arg(10, 1, 2^50)

local first = redis.call('HMGET', receipt_key, 'user', 'package', 'event', 'credited',
  'debt_repaid')
if first[1] then
  if first[1] ~= user or first[2] ~= package then
    return {'receipt_reused', 'receipt ' .. receipt .. ' was already used for package ' ..
      first[2] .. ' of user ' .. first[1]}
  end
  return {'ok', first[3], stored_int(wallet, 'coins'), tonumber(first[4]), tonumber(first[5]),
    stored_int(wallet, 'debt')}
end
if adult ~= 1 then
  return {'underage', 'coin purchases need a verified adult account'}
end
local balance, debt = stored_int(wallet, 'coins'), stored_int(wallet, 'debt')
local repaid = math.min(debt, coins)
local credited = coins - repaid
if balance + credited > max_balance then
  return {'balance_limit', string.format('a balance above %d coins is refused', max_balance)}
end

append_ledger(ledger, 'event', event, 'kind', 'purchase', 'ts', now, 'user', user,
  'receipt', receipt, 'package', package, 'coins', coins, 'credited', credited,
  'debt_repaid', repaid, 'price_cents', price_cents, 'currency', currency)
local after = redis.call('HINCRBY', wallet, 'coins', credited)
if repaid > 0 then
  redis.call('HINCRBY', wallet, 'debt', -repaid)
end
redis.call('HSET', receipt_key, 'user', user, 'package', package, 'coins', coins,
  'credited', credited, 'debt_repaid', repaid, 'price_cents', price_cents, 'event', event,
  'ts', now)
return {'ok', event, after, credited, repaid, debt - repaid}
