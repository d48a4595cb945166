-- Settles one gift. Checks in the contract's order: the key (a replay answers with the first
-- result, even at balance 0, and writes nothing: its event was written the first time), the
-- room is live, debt, age, daily and weekly limits, balance. Then, and only then: ledger
-- entry, debit, credit, the creator's held diamonds, the boards and the room's coins this
-- session (a first settlement only: a replay returned above), key record (24 h), the day's
-- and week's spend, the combo, and the gift's event in the room's log. Time, day and week are
-- Redis's own (money_now).
-- KEYS: sender wallet, creator wallet, key record, combo, ledger, creator's held diamonds,
-- room record ('' for a caller that moves money only: no room check), room log ('' under the
-- memory broker, whose hub publishes the event itself), credit outbox ('' on one Redis);
-- then the boards (the creator's, counted here on one Redis): the room's session board (''
-- for a caller that moves money only), the creator's week board prefix, the room's names,
-- the creator partition's creators_day board prefix and its creator names.
-- On a Redis Cluster (KEYS[9] = the outbox giftstream:{pSS}:credits:pCC) the creator's keys
-- live on another shard: KEYS[2], [6], [7], [8] and [10] to [14] are then the outbox's name
-- again (a key of
-- the sender's slot; '' would hash to slot 0 and the cluster refuses keys of two slots) and
-- are not touched. The script checks and debits the sender, appends the ledger entry, and
-- appends the creator's part to the outbox under the ledger entry's id; crediting.py credits
-- it on the creator's shard. The gateway checked the room is live (the room record is there).
-- ARGV: event, sender, creator, room, gift, key, count, coins, diamonds, adult, now ('' in
-- production: Redis's TIME), key ttl, combo gap, combo ttl, payout hold in days; then the
-- event's parts, JSON encoded by the gateway as the protocol encodes them (room id, sender
-- {"id","name"}, gift {"id","name","coins","animation"}) and the log's size; the sender's
-- name as JSON text ('' = the id), for the boards; 1 for a gift sent in the room (the
-- gateway's), 0 for money only: only the former counts on the room's session board.
-- Reply: {'ok', event, sender coins after, combo, diamonds, ts} -- the first result on a
-- replay -- or {refusal code, message}.
local sender_wallet, creator_wallet, key_record = KEYS[1], KEYS[2], KEYS[3]
local combo_key, ledger, held_key = KEYS[4], KEYS[5], KEYS[6]
local room_record, room_log = KEYS[7], KEYS[8]
local outbox = KEYS[9] or ''
local session_board, week_prefix, names = KEYS[10], KEYS[11], KEYS[12]
local day_prefix, creator_names = KEYS[13], KEYS[14]
local cluster = outbox ~= ''
if cluster then
  for _, k in ipairs({creator_wallet, held_key, room_record, room_log, session_board,
      week_prefix, names, day_prefix, creator_names}) do
    if k ~= outbox then
      error('giftstream: on a cluster the creator\'s keys are passed as the outbox')
    end
  end
  room_record, room_log = '', ''
end
local event, sender, creator, room, gift, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local count = int_arg(7, 1, 99)
local coins = int_arg(8, 1, 99e9)  -- gift price (at most 1e9) times count
local diamonds = int_arg(9, 0, coins)
local adult = int_arg(10, 0, 1)
local now = money_now(11)
local key_ttl = int_arg(12, 1, 2^40)
local combo_gap, combo_ttl = int_arg(13, 1, 2^40), int_arg(14, 1, 2^40)
local hold_days = int_arg(15, 0, 3650)
local room_json, sender_json, gift_json = ARGV[16], ARGV[17], ARGV[18]
local log_size = int_arg(19, 0, 2^31)
local sender_name = name_json(ARGV[20], sender)
local in_room = int_arg(21, 0, 1)  -- a gateway's gift in the room: it counts on the session
local today = epoch_day(now)
local week = iso_week(today)

local first = redis.call('HMGET', key_record, 'room', 'gift', 'count', 'event', 'coins', 'combo',
  'diamonds', 'ts')
if first[1] then
  if first[1] ~= room or first[2] ~= gift or tonumber(first[3]) ~= count then
    return {'key_reused', 'key ' .. key .. ' was already used for ' .. first[3] .. ' x ' ..
      first[2] .. ' in room ' .. first[1]}
  end
  return {'ok', first[4], tonumber(first[5]), tonumber(first[6]), tonumber(first[7]),
    tonumber(first[8])}
end

if room_record ~= '' and redis.call('HGET', room_record, 'live') ~= '1' then
  return {'room_not_live', 'room ' .. room .. ' is not live'}
end

local debt = stored_int(sender_wallet, 'debt')
if debt > 0 then
  return {'debt', string.format('you owe %d coins from a refunded purchase; ' ..
    'buy coins to settle it before gifting', debt)}
end
if adult ~= 1 then
  return {'underage', 'paid gifts need a verified adult account'}
end
local spent_day = stamped(sender_wallet, 'spent_day', 'spent_day_coins', today)
local spent_week = stamped(sender_wallet, 'spent_week', 'spent_week_coins', week)
if redis.call('HEXISTS', sender_wallet, 'daily_limit') == 1 then
  local limit = stored_int(sender_wallet, 'daily_limit')
  if spent_day + coins > limit then
    return {'spending_limit', string.format('this gift of %d coins would take today\'s spend ' ..
      'to %d, past your daily limit of %d', coins, spent_day + coins, limit)}
  end
end
if redis.call('HEXISTS', sender_wallet, 'weekly_limit') == 1 then
  local limit = stored_int(sender_wallet, 'weekly_limit')
  if spent_week + coins > limit then
    return {'spending_limit', string.format('this gift of %d coins would take this week\'s ' ..
      'spend to %d, past your weekly limit of %d', coins, spent_week + coins, limit)}
  end
end
local balance = stored_int(sender_wallet, 'coins')
if balance < coins then
  return {'insufficient_coins', string.format('this gift costs %d coins; you have %d',
    coins, balance)}
end
local due = {}
local boards, creator_name
if not cluster then
  stored_int(creator_wallet, 'diamonds')  -- a corrupt balance stops the script here, not midway
  local _held
  _held, due = held_buckets(held_key, today)
  -- the session board counts gifts in a live room (checked above); money-only callers have none
  local session = in_room == 1 and room_record ~= '' and session_board or ''
  boards = board_plan(session, room_record, week_prefix, names, day_prefix, creator_names, now)
  creator_name = name_json(room_record ~= '' and redis.call('HGET', room_record, 'creator_name')
    or '', creator)
end
local streak = redis.call('HMGET', combo_key, 'gift', 'combo', 'at')
local combo = 1
if streak[1] == gift and now - tonumber(streak[3]) < combo_gap then
  combo = tonumber(streak[2]) + 1
end
-- Diamonds become payable at the start of the UTC day hold_days + 1 after the gift's day:
-- at least hold_days whole days later (chargebacks arrive within that time).
local release = hold_days > 0 and today + hold_days + 1 or nil
local payable_at = release and release * DAY_MS or now
local seq, gift_event
if room_log ~= '' then
  -- the event is the protocol's gift event byte for byte (GiftEvent.as_dict's key order);
  -- the event id is spliced in unquoted, so it must need no JSON escaping
  if room_record == '' or log_size < 1 or not string.match(event, '^[%w_%-]+$') then
    error('giftstream: a room log needs its record, a size and a plain event id')
  end
  seq = room_seq(room_record, room_log) + 1
  gift_event = '{"type":"gift","room":' .. room_json .. string.format(',"seq":%d', seq) ..
    ',"event":"' .. event .. '","sender":' .. sender_json .. ',"gift":' .. gift_json ..
    string.format(',"count":%d,"combo":%d,"ts":%d}', count, combo, now)
end

local entry = append_ledger(ledger, 'event', event, 'kind', 'gift', 'ts', now, 'sender', sender,
  'creator', creator, 'room', room, 'gift', gift, 'count', count, 'coins', coins,
  'diamonds', diamonds, 'platform', coins - diamonds, 'key', key, 'combo', combo,
  'payable_at', payable_at)
local after = redis.call('HINCRBY', sender_wallet, 'coins', -coins)
if cluster then
  -- The ledger's ids only grow on this shard and only this script appends to an outbox, with
  -- the ledger's id, so this XADD cannot be refused.
  redis.call('XADD', outbox, entry, 'event', event, 'creator', creator, 'room', room,
    'diamonds', diamonds, 'release', release or 0, 'ts', now, 'count', count, 'combo', combo,
    'room_json', room_json, 'sender_json', sender_json, 'gift_json', gift_json,
    'log_size', log_size, 'sender', sender, 'coins', coins, 'name_json', sender_name,
    'session', in_room)
else
  redis.call('HINCRBY', creator_wallet, 'diamonds', diamonds)
  if release and diamonds > 0 then
    redis.call('HINCRBY', held_key, release, diamonds)
  end
  if #due > 0 then
    redis.call('HDEL', held_key, unpack(due))
  end
  count_on_boards(boards, sender, sender_name, creator, creator_name, coins)
end
redis.call('HSET', key_record, 'room', room, 'gift', gift, 'count', count, 'event', event,
  'coins', after, 'combo', combo, 'diamonds', diamonds, 'ts', now)
redis.call('PEXPIRE', key_record, key_ttl)
redis.call('HSET', sender_wallet, 'spent_day', today, 'spent_day_coins', spent_day + coins,
  'spent_week', week, 'spent_week_coins', spent_week + coins)
redis.call('HSET', combo_key, 'gift', gift, 'combo', combo, 'at', now)
redis.call('PEXPIRE', combo_key, combo_ttl)
if gift_event then
  append_room_event(room_record, room_log, seq, 'gift', gift_event, log_size)
end
return {'ok', event, after, combo, diamonds, now}
