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
