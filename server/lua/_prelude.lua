-- Helpers shared by every script: server/scripts.py loads the shebang + this file + the
-- script as one script. Reads may stop a script with error(); writes come after all reads,
-- because Redis does not roll back a script that fails midway.

-- v as a number if it is an integer in the form Redis itself writes ('0', '-12', '345': no
-- '+', '-0', leading zeros, spaces, '.', exponent or hex) and exact as a double (|v| < 2^53),
-- else nil. tonumber alone takes ' 5', '0x10', '1e2' and '5.0', rounds 2^53 + 1 to 2^53, and
-- gives -0 for '-0', which HINCRBY then refuses midway through the writes.
local function exact_int(v)
  local n = type(v) == 'string' and (v == '0' or string.match(v, '^%-?[1-9]%d*$')) and tonumber(v)
  if n and math.abs(n) < 2^53 then
    return n
  end
  return nil
end

-- ARGV[i] as an integer from low to high; anything else stops the script.
local function int_arg(i, low, high)
  local n = exact_int(ARGV[i])
  if not n or n < low or n > high then
    error('giftstream: ARGV[' .. i .. '] is not an integer in range: ' .. tostring(ARGV[i]))
  end
  return n
end

-- A stored integer (a hash field, or a string key when field is nil), 0 when absent. Only
-- the form Redis itself writes passes, so HINCRBY/INCRBY on it cannot fail later.
local function stored_int(key, field)
  local v
  if field then v = redis.call('HGET', key, field) else v = redis.call('GET', key) end
  if not v then return 0 end
  local n = exact_int(v)
  if not n then
    error('giftstream: ' .. key .. ' ' .. (field or '') .. ' is not an exact integer: ' .. v)
  end
  return n
end

-- Appends one ledger entry: field `data`, a JSON object of name, value, name, value, ...
-- cjson prints numbers with 14 significant digits, so integers are written with %d.
local function append_ledger(ledger, ...)
  local fields, parts = {...}, {}
  for i = 1, select('#', ...), 2 do
    local value = fields[i + 1]
    if type(value) == 'number' then
      value = string.format('%d', value)
    else
      value = cjson.encode(value)
    end
    parts[#parts + 1] = cjson.encode(fields[i]) .. ':' .. value
  end
  return redis.call('XADD', ledger, '*', 'data', '{' .. table.concat(parts, ',') .. '}')
end

-- Money time, in ms: Redis's own clock (TIME), so the UTC day of a spend, a combo's gap and
-- every entry's ts are the same whichever gateway asks, however skewed its clock. ARGV[i] is
-- '' from every production Wallet; only a Wallet built with a test clock fills it in.
local function money_now(i)
  if ARGV[i] == '' then
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return int_arg(i, 0, 2^50)
end

local DAY_MS = 86400000

-- The UTC day of ms, as days since 1970-01-01.
local function epoch_day(ms)
  return math.floor(ms / DAY_MS)
end

-- The ISO week (Monday to Sunday, UTC) of an epoch day, as its Monday's epoch day
-- (1970-01-01 was a Thursday).
local function iso_week(day)
  return day - (day + 3) % 7
end

-- An epoch day as YYYY-MM-DD, for messages (Hinnant's civil_from_days; Redis's Lua has no os.date).
local function day_name(day)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, d)
end

-- A creator's held diamonds (KEYS hash: release epoch day -> diamonds) as of `today`: the
-- total still held, the fields already due (to delete), and the earliest release still ahead.
-- Every field and value must be an exact integer, checked here before any write.
local function held_buckets(key, today)
  local flat = redis.call('HGETALL', key)
  local held, due, next_day = 0, {}, nil
  for i = 1, #flat, 2 do
    local day, diamonds = exact_int(flat[i]), exact_int(flat[i + 1])
    if not day or not diamonds then
      error('giftstream: ' .. key .. ' ' .. flat[i] .. ' is not an exact integer: ' .. flat[i + 1])
    end
    if day <= today then
      due[#due + 1] = flat[i]
    else
      held = held + diamonds
      if not next_day or day < next_day then next_day = day end
    end
  end
  return held, due, next_day
end

-- A day-stamped counter kept in a hash (fields stamp and count): its count when the stamp is
-- `current`, else 0 (the day or week it counted is over).
local function stamped(key, stamp_field, count_field, current)
  if stored_int(key, stamp_field) == current then
    return stored_int(key, count_field)
  end
  stored_int(key, count_field)  -- a corrupt count stops the script here, not midway
  return 0
end

-- Redis's clock in ms (TIME): presence expiry and a creator's last sighting, the same on
-- every gateway whatever its own clock says.
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Room logs (server/realtime/redis_broker.py). A room's events are numbered by one counter
-- in its hash, `seq`, and appended to its log stream with the ID 0-<seq>, in the same script:
-- stream order is seq order, whichever gateway wrote. next_seq is split in two so a money
-- script keeps every check before its first write: room_seq reads (the last seq given, lifted
-- above `seq_reserved`, the memory broker's bound, and above the log's newest entry, so no
-- seq is given twice whichever broker numbered the room, and XADD cannot refuse the ID), and
-- append_room_event writes. A log of the wrong type stops the script here, at a read.
local function room_seq(room_hash, room_log)
  local seq = math.max(stored_int(room_hash, 'seq'), stored_int(room_hash, 'seq_reserved'))
  local newest = redis.call('XREVRANGE', room_log, '+', '-', 'COUNT', 1)
  if newest[1] then
    local logged = exact_int(string.match(newest[1][1], '^0%-(%d+)$') or '')
    if not logged then
      error('giftstream: ' .. room_log .. ' holds an entry not numbered 0-<seq>: ' .. newest[1][1])
    end
    seq = math.max(seq, logged)
  end
  return seq
end

-- Appends one event (`data`, its JSON, already holding `seq`) to the room's log, capped near
-- `log_size` entries, and records its seq as the room's last.
local function append_room_event(room_hash, room_log, seq, kind, data, log_size)
  local id = string.format('0-%d', seq)
  redis.call('HSET', room_hash, 'seq', seq)
  redis.call('XADD', room_log, 'MAXLEN', '~', log_size, id, 't', kind, 'd', data)
end

-- Leaderboards (server/money/boards.py). A gift counts on its room's session board, its
-- creator's week board and its creator partition's creators_day board in the step that
-- credits the creator, once. The week's and day's boards are named by a prefix the caller
-- passes and the period's epoch day (the week's Monday) appended here from the gift's time.
-- Names are kept as JSON text (the gateway's encoding), spliced into the `leaders` event.
local WEEK_BOARD_MS = 15 * DAY_MS  -- a week's board is kept this long after its Monday
local DAY_BOARD_MS = 3 * DAY_MS  -- a day's board is kept this long after its start
local NAMES_MS = 15 * DAY_MS  -- a names hash is kept this long after its last write

-- A read that stops the script when `key` exists as another type than `kind`, so the writes
-- after it cannot fail with WRONGTYPE midway.
local function want_type(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then
    error('giftstream: ' .. key .. ' is a ' .. found .. ', not a ' .. kind)
  end
end

-- A display name as JSON text: `json` when it is a JSON string, the id quoted when it is ''
-- (ids need no escaping); anything else stops the script.
local function name_json(json, id)
  if json == '' or json == nil then
    return '"' .. id .. '"'
  end
  local ok, decoded = pcall(cjson.decode, json)
  if not ok or type(decoded) ~= 'string' then
    error('giftstream: a name is not JSON text: ' .. tostring(json))
  end
  return json
end

-- The checks of counting one gift at `ms` on the boards (every key's type), before any write;
-- returns the plan `count_on_boards` carries out. `session` is '' when the gift counts on no
-- session board; when it counts, it also counts on the room's coins this session, the field
-- `session_coins` of the room's record `record` (the ops feed's `coins`; room_open.lua sets
-- it to 0): the same gifts, once, in the same step, so the two always agree.
local function board_plan(session, record, week_prefix, names, day_prefix, creator_names, ms)
  local day = epoch_day(ms)
  local week = iso_week(day)
  local plan = {
    session = session, record = record, names = names, creator_names = creator_names,
    week = week_prefix .. string.format('%d', week),
    day = day_prefix .. string.format('%d', day),
    week_ttl = math.max(week * DAY_MS + WEEK_BOARD_MS - ms, 1),
    day_ttl = math.max(day * DAY_MS + DAY_BOARD_MS - ms, 1),
  }
  if session ~= '' then
    want_type(session, 'zset')
    want_type(record, 'hash')
    stored_int(record, 'session_coins')  -- a corrupt total stops the script here, not midway
  end
  want_type(plan.week, 'zset')
  want_type(plan.day, 'zset')
  want_type(names, 'hash')
  want_type(creator_names, 'hash')
  return plan
end

local function count_on_boards(plan, sender, sender_name, creator, creator_name, coins)
  if plan.session ~= '' then
    redis.call('ZINCRBY', plan.session, coins, sender)
    redis.call('HINCRBY', plan.record, 'session_coins', coins)
  end
  redis.call('ZINCRBY', plan.week, coins, sender)
  redis.call('PEXPIRE', plan.week, plan.week_ttl)
  redis.call('ZINCRBY', plan.day, coins, creator)
  redis.call('PEXPIRE', plan.day, plan.day_ttl)
  redis.call('HSET', plan.names, sender, sender_name)
  redis.call('PEXPIRE', plan.names, NAMES_MS)
  redis.call('HSET', plan.creator_names, creator, creator_name)
  redis.call('PEXPIRE', plan.creator_names, NAMES_MS)
end

-- a < b byte by byte, as Redis orders members (Lua's `<` follows the locale's collation).
local function bytes_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The board's top n (reads only): {user, coins, name JSON or false}, highest first, ties by
-- user id (byte order). Those above the n-th score are all read and sorted; of those tied
-- at it, Redis gives the first in byte order itself (equal scores sort by member), so a
-- board of many equal senders costs n, not its size.
local function board_top(board, names, n)
  local head = redis.call('ZREVRANGE', board, 0, n - 1, 'WITHSCORES')
  if #head == 0 then
    return {}
  end
  local cutoff = head[#head]
  local above = redis.call('ZRANGEBYSCORE', board, '(' .. cutoff, '+inf', 'WITHSCORES')
  local top = {}
  for i = 1, #above, 2 do
    top[#top + 1] = {above[i], tonumber(above[i + 1])}
  end
  table.sort(top, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return bytes_less(a[1], b[1])
  end)
  local tied = redis.call('ZRANGEBYSCORE', board, cutoff, cutoff, 'LIMIT', 0, n - #top)
  for _, user in ipairs(tied) do
    top[#top + 1] = {user, tonumber(cutoff)}
  end
  for _, entry in ipairs(top) do
    entry[3] = redis.call('HGET', names, entry[1])
  end
  return top
end
