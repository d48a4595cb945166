-- Adds one gift to its creator's UTC day, once per event id: the "seen before?" check and the
-- increments are this one script, so a redelivered entry can never count twice, nor a crash
-- leave an event marked seen but not counted. Every check comes before the first write.
-- KEYS: the creator's day's seen set, the creator's earnings hash.
-- ARGV: event id, day (YYYY-MM-DD), diamonds, coins, count, keep the seen set until (ms).
-- Reply: 1 when counted now, 0 when the event was counted before.
local seen, totals = KEYS[1], KEYS[2]
local event, day = ARGV[1], ARGV[2]
local diamonds, coins, count = int_arg(3, 0, 2^52), int_arg(4, 0, 2^52), int_arg(5, 1, 2^52)
local keep_until = int_arg(6, 1, 2^52)
local fields = {day .. ':diamonds', day .. ':coins', day .. ':gifts', day .. ':events'}
for _, field in ipairs(fields) do
  stored_int(totals, field)  -- a corrupt total stops the script here, not midway
end

if redis.call('SADD', seen, event) == 0 then
  return 0
end
redis.call('PEXPIREAT', seen, keep_until)
redis.call('HINCRBY', totals, fields[1], diamonds)
redis.call('HINCRBY', totals, fields[2], coins)
redis.call('HINCRBY', totals, fields[3], count)
redis.call('HINCRBY', totals, fields[4], 1)
return 1
