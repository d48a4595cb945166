-- Reverses a purchase once: takes back the package's coins, down to a balance of 0 at most,
-- and records the part it could not take back as debt (a user in debt cannot gift).
-- The wallet in KEYS[2] is the receipt's user, read by the caller first (it never changes).
-- Reply: {'ok', refund event, coins taken, debt added, coins now, debt now} -- the first
-- result on a replay -- or {refusal code, message}.
local receipt_key, wallet, ledger = KEYS[1], KEYS[2], KEYS[3]
local event, user, receipt = ARGV[1], ARGV[2], ARGV[3]
local now = money_now(4)  -- '' in production: Redis's TIME

local purchase = redis.call('HMGET', receipt_key, 'user', 'coins', 'event', 'refund_event',
  'refund_coins', 'refund_debt')
if not purchase[1] then
  return {'unknown_receipt', 'no purchase with receipt ' .. receipt}
end
if purchase[1] ~= user then
  error('giftstream: receipt ' .. receipt .. ' belongs to ' .. purchase[1] .. ', not ' .. user)
end
if purchase[4] then
  return {'ok', purchase[4], tonumber(purchase[5]), tonumber(purchase[6]),
    stored_int(wallet, 'coins'), stored_int(wallet, 'debt')}
end
local coins = exact_int(purchase[2])  -- corrupt, it would fail HINCRBY after the XADD
if not coins or coins < 1 then
  error('giftstream: receipt ' .. receipt .. ' coins is not an exact integer: ' ..
    tostring(purchase[2]))
end
local balance, debt = stored_int(wallet, 'coins'), stored_int(wallet, 'debt')
local taken = math.min(balance, coins)
local owed = coins - taken

append_ledger(ledger, 'event', event, 'kind', 'refund', 'ts', now, 'user', user,
  'receipt', receipt, 'purchase', purchase[3], 'coins', taken, 'debt', owed)
if taken > 0 then  -- never HINCRBY by -taken when it is 0: Lua's -0 is refused as "-0"
  redis.call('HINCRBY', wallet, 'coins', -taken)
end
if owed > 0 then
  redis.call('HINCRBY', wallet, 'debt', owed)
end
redis.call('HSET', receipt_key, 'refund_event', event, 'refund_coins', taken,
  'refund_debt', owed, 'refund_ts', now)
return {'ok', event, taken, owed, balance - taken, debt + owed}
