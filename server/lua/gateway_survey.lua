#!lua flags=allow-oom
-- Every live gateway's heartbeat (server/realtime/registry.py), by Redis's clock: a field
-- older than the expiry is a gateway that died without a word, and one that cannot be read
-- is nobody's; both are deleted and left out.
-- KEYS: the gateways hash. ARGV: expiry in ms.
-- Returns {now_ms, id, heartbeat, id, heartbeat, ...}.
-- (allow-oom: it only reads and deletes, so the ops stats outlive a full Redis)
local expiry = int_arg(1, 1, 2^53 - 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local live, gone = {now}, {}
for i = 1, #fields, 2 do
  local ok, beat = pcall(cjson.decode, fields[i + 1])
  local ts = ok and type(beat) == 'table' and type(beat.ts) == 'number' and beat.ts
  if ts and now - ts <= expiry then
    live[#live + 1] = fields[i]
    live[#live + 1] = fields[i + 1]
  else
    gone[#gone + 1] = fields[i]
  end
end
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
end
return live
