#!lua flags=allow-oom
-- One gateway's heartbeat (server/realtime/registry.py): its counters, stamped with Redis's
-- clock so every reader judges its age by one clock.
-- KEYS: the gateways hash. ARGV: gateway id, connections, gifts, coins (since it started),
-- then error code, count, ... (its error replies by code since it started; may be none).
-- (allow-oom: a bounded overwrite of one small field, so the ops stats outlive a full Redis)
local connections = int_arg(2, 0, 2^53 - 1)
local gifts = int_arg(3, 0, 2^53 - 1)
local coins = int_arg(4, 0, 2^53 - 1)
if #ARGV % 2 ~= 0 or #ARGV > 4 + 2 * 64 then
  error('giftstream: refusals must be at most 64 code, count pairs')
end
local refusals = {}
for i = 5, #ARGV, 2 do
  local code = ARGV[i]
  if #code > 32 or not string.match(code, '^[a-z_]+$') then
    error('giftstream: not an error code: ' .. code)
  end
  refusals[#refusals + 1] = string.format('"%s":%d', code, int_arg(i + 1, 0, 2^53 - 1))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format(
  '{"connections":%d,"gifts":%d,"coins":%d,"ts":%d,"refusals":{%s}}',
  connections, gifts, coins, now, table.concat(refusals, ',')))
return now
