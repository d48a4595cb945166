-- Helpers shared by every money script: server/wallet.py loads "#!lua" + this file + the
-- script as one script. Reads may stop a script with error(); writes come after all reads,
-- because Redis does not roll back a script that fails midway.

-- ARGV[i] as an integer from low to high; anything else (a float, text) stops the script.
local function int_arg(i, low, high)
  local n = tonumber(ARGV[i])
  if n == nil or n ~= math.floor(n) or n < low or n > high then
    error('giftstream: ARGV[' .. i .. '] is not an integer in range: ' .. ARGV[i])
  end
  return n
end

-- A stored integer (a hash field, or a string key when field is nil), 0 when absent. Only
-- the form Redis itself writes passes: tonumber would take "1e3", " 5" or "05", which HINCRBY
-- would then refuse midway through the writes.
local function stored_int(key, field)
  local v
  if field then v = redis.call('HGET', key, field) else v = redis.call('GET', key) end
  if not v then return 0 end
  local n = (v == '0' or string.match(v, '^%-?[1-9]%d*$')) and tonumber(v)
  if not n or math.abs(n) >= 2^53 then
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
