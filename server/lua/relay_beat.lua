#!lua flags=allow-oom
-- A relay process's heartbeat (server/ledger/relay/share.py), by Redis's clock so every relay
-- judges who is alive by one clock: writes "ARGV[1] lives until now + ttl" and deletes the
-- heartbeats past their time (relays killed without a word). ARGV[1] = '' only reads
-- (`relay --status`).
-- KEYS: the relays hash. ARGV: relay id ('' = read only), ttl in ms.
-- Returns {now_ms, id, expires_ms, id, expires_ms, ...}, the live relays only.
-- (allow-oom: one small field overwritten, so the relays keep sharing on a full Redis)
local ttl = int_arg(2, 1, 2^50)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local live, gone = {now}, {}
for i = 1, #fields, 2 do
  local expires = tonumber(fields[i + 1])
  if fields[i] == ARGV[1] then
    -- written below
  elseif expires and expires > now then
    live[#live + 1] = fields[i]
    live[#live + 1] = fields[i + 1]
  else
    gone[#gone + 1] = fields[i]
  end
end
if ARGV[1] ~= '' then
  local expires = string.format('%d', now + ttl)
  redis.call('HSET', KEYS[1], ARGV[1], expires)
  live[#live + 1] = ARGV[1]
  live[#live + 1] = expires
  if #gone > 0 then
    redis.call('HDEL', KEYS[1], unpack(gone))
  end
end
return live
