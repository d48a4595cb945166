-- Saves one folded chunk of ledger entries into the checkpoint, only if the checkpoint is
-- still where the caller read it (compare-and-set on last_id): the fold itself runs in
-- Python (server/ledger/checkpoint.py, the audit's own replay), this makes its result land whole.
-- A chunk at or below the stored last_id was folded before: nothing is written (idempotent
-- by stream id). Values are written as they are, so every check is made before the writes.
-- KEYS: main hash, wallets hash, receipts hash, payout keys set, negatives set, breaches list.
-- ARGV: expected last_id ('' when none), new last_id, then six counts (main pairs, wallet
-- pairs, receipt pairs, payout keys, negatives, breaches), then those items in that order.
-- Reply: 'ok', 'folded' (already there) or 'conflict' (someone folded meanwhile: read again).
local main, wallets, receipts, payouts, negatives, breaches =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local expected, new_last = ARGV[1], ARGV[2]

local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then
    error('giftstream: not a stream id: ' .. id)
  end
  return ms, seq
end

-- Decimal strings without leading zeros, compared exactly (no doubles: a seq may be 2^64-1).
local function less(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function later(a, b)
  local a_ms, a_seq = parts(a)
  local b_ms, b_seq = parts(b)
  if a_ms ~= b_ms then
    return less(b_ms, a_ms)
  end
  return less(b_seq, a_seq)
end

local counts = {}
for i = 1, 6 do
  counts[i] = int_arg(2 + i, 0, 2^31)
end
local items = 2 * (counts[1] + counts[2] + counts[3]) + counts[4] + counts[5] + counts[6]
if #ARGV ~= 8 + items then
  error(string.format('giftstream: %d arguments for %d items', #ARGV, items))
end
-- Keys only written are never read first, so their type is checked here: HSET, SADD or
-- RPUSH failing on one would leave the keys before it written.
for k, kind in ipairs({'hash', 'hash', 'hash', 'set', 'set', 'list'}) do
  local found = redis.call('TYPE', KEYS[k]).ok
  if found ~= kind and found ~= 'none' then
    error('giftstream: ' .. KEYS[k] .. ' is a ' .. found .. ', not a ' .. kind)
  end
end
parts(new_last)
local stored = redis.call('HGET', main, 'last_id')
if stored and not later(new_last, stored) then
  return 'folded'
end
if (stored or '') ~= expected then
  return 'conflict'
end

local i = 9
local function pairs_into(key, n)
  for _ = 1, n do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
local function members_into(command, key, n)
  for _ = 1, n do
    redis.call(command, key, ARGV[i])
    i = i + 1
  end
end
pairs_into(main, counts[1])
pairs_into(wallets, counts[2])
pairs_into(receipts, counts[3])
members_into('SADD', payouts, counts[4])
members_into('SADD', negatives, counts[5])
members_into('RPUSH', breaches, counts[6])
redis.call('HSET', main, 'last_id', new_last)
return 'ok'
