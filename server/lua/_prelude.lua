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
