#!lua flags=allow-oom
-- One gateway's heartbeat (server/realtime/registry.py): its counters, stamped with Redis's
-- clock so every reader judges its age by one clock.
-- KEYS: the gateways hash. ARGV: gateway id, connections, gifts, coins (since it started).
-- (allow-oom: a bounded overwrite of one small field, so the ops stats outlive a full Redis)
local connections = int_arg(2, 0, 2^53 - 1)
local gifts = int_arg(3, 0, 2^53 - 1)
local coins = int_arg(4, 0, 2^53 - 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], string.format(
  '{"connections":%d,"gifts":%d,"coins":%d,"ts":%d}', connections, gifts, coins, now))
return now
