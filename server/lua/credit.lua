-- Crediting, step 3 (server/money/crediting.py): credits one source partition's gifts to
-- their creators in one target partition, on the target's shard, and moves the source's
-- cursor in the same step: a credit and its cursor are kept or lost together (a failover).
-- The cursor is a compare-and-set: another runner that credited these entries first moved
-- it, and this call then writes nothing ({'moved', the cursor now}).
-- For each entry: the creator's diamonds, their held bucket (release day; one already past
-- is not held), and when the entry carries the room's event parts and the room is live, the
-- protocol's gift event in the room's log with the room's next seq (as send_gift.lua writes
-- it on one Redis, byte for byte). A gift whose room ended before its credit gets no event.
-- And the boards, as send_gift.lua counts them on one Redis, by the gift's own time (ts): the
-- week's and the creators_day board, and, for a gift sent in the room (`session` 1) whose
-- room is still in the session it was sent in (live, opened by Redis's clock at or before
-- ts: a room ended and opened again since is another session), the session board and the
-- room's coins this session (its record's `session_coins`). An entry
-- from before the boards (coins 0) counts on none.
-- KEYS[1]: the target's cursors hash giftstream:{pCC}:credited; then per entry: creator
-- wallet, creator's held diamonds, room record, room log, the room's session board, the
-- creator's week board prefix, the creator's names, the creators_day board prefix, the
-- creator names (for an entry whose room is not in this partition the record, log and
-- session board are the wallet's name again, untouched: a key of another slot is refused by
-- the cluster).
-- ARGV: the cursor's field pSS, the cursor expected ('' = none yet); then per entry its
-- outbox id and event, diamonds, release (epoch day, 0 = not held), ts, count, combo,
-- room_json, sender_json, gift_json ('' = no event), log_size, creator, sender, coins, the
-- sender's name as JSON text, session (0/1).
-- Reply: {'ok', entries credited} or {'moved', the stored cursor}.
local PER_ENTRY, KEYS_PER_ENTRY = 16, 9
local cursors, field, expected = KEYS[1], ARGV[1], ARGV[2]
local entries = (#ARGV - 2) / PER_ENTRY
if entries < 1 or entries ~= math.floor(entries) or #KEYS ~= 1 + KEYS_PER_ENTRY * entries then
  error('giftstream: credit needs the cursors hash, field, expected, then ' .. KEYS_PER_ENTRY ..
    ' keys and ' .. PER_ENTRY .. ' args per entry')
end

local stored = redis.call('HGET', cursors, field) or ''
if stored ~= expected then
  return {'moved', stored}
end

local today = epoch_day(redis_now())
local plan, due_of, seq_of = {}, {}, {}
local last_id
for e = 1, entries do
  local k, a = 1 + (e - 1) * KEYS_PER_ENTRY, 2 + (e - 1) * PER_ENTRY
  local wallet, held, record, log = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local session_board, week_prefix, names = KEYS[k + 5], KEYS[k + 6], KEYS[k + 7]
  local day_prefix, creator_names = KEYS[k + 8], KEYS[k + 9]
  local has_room = record ~= wallet
  local id, event = ARGV[a + 1], ARGV[a + 2]
  if not string.match(id, '^%d+%-%d+$') then
    error('giftstream: not a stream id: ' .. id)
  end
  local diamonds = int_arg(a + 3, 0, 99e9)
  local release = int_arg(a + 4, 0, 2^40)
  local ts = int_arg(a + 5, 0, 2^50)
  local count = int_arg(a + 6, 1, 99)
  local combo = int_arg(a + 7, 1, 2^40)
  local room_json, sender_json, gift_json = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10]
  local log_size = int_arg(a + 11, 0, 2^31)
  local creator, sender = ARGV[a + 12], ARGV[a + 13]
  local coins = int_arg(a + 14, 0, 99e9)
  local sender_name = coins > 0 and name_json(ARGV[a + 15], sender)
  local in_room = int_arg(a + 16, 0, 1)
  stored_int(wallet, 'diamonds')  -- a corrupt balance stops the script here, not midway
  if not due_of[held] then
    local _held, due = held_buckets(held, today)
    due_of[held] = due
  end
  local gift_event, seq
  local live = has_room and redis.call('HGET', record, 'live') == '1'
  local boards, creator_name
  if coins > 0 then
    local session = ''
    if in_room == 1 and live and stored_int(record, 'opened') <= ts then
      session = session_board
    end
    boards = board_plan(session, record, week_prefix, names, day_prefix, creator_names, ts)
    creator_name = name_json(has_room and redis.call('HGET', record, 'creator_name') or '',
      creator)
  end
  if room_json ~= '' and live then
    -- the event id is spliced in unquoted, so it must need no JSON escaping
    if log_size < 1 or not string.match(event, '^[%w_%-]+$') then
      error('giftstream: a room event needs a log size and a plain event id')
    end
    seq = (seq_of[log] or room_seq(record, log)) + 1
    seq_of[log] = seq
    gift_event = '{"type":"gift","room":' .. room_json .. string.format(',"seq":%d', seq) ..
      ',"event":"' .. event .. '","sender":' .. sender_json .. ',"gift":' .. gift_json ..
      string.format(',"count":%d,"combo":%d,"ts":%d}', count, combo, ts)
  end
  plan[e] = {wallet = wallet, held = held, record = record, log = log, diamonds = diamonds,
    release = release, seq = seq, gift_event = gift_event, log_size = log_size,
    boards = boards, sender = sender, creator = creator, sender_name = sender_name,
    creator_name = creator_name, coins = coins}
  last_id = id
end

for _, p in ipairs(plan) do
  redis.call('HINCRBY', p.wallet, 'diamonds', p.diamonds)
  if p.release > today and p.diamonds > 0 then
    redis.call('HINCRBY', p.held, p.release, p.diamonds)
  end
  if p.gift_event then
    append_room_event(p.record, p.log, p.seq, 'gift', p.gift_event, p.log_size)
  end
  if p.boards then
    count_on_boards(p.boards, p.sender, p.sender_name, p.creator, p.creator_name, p.coins)
  end
end
for held, due in pairs(due_of) do
  if #due > 0 then
    redis.call('HDEL', held, unpack(due))
  end
end
redis.call('HSET', cursors, field, last_id)
return {'ok', entries}
