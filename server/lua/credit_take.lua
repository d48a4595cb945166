-- Crediting, step 2 (server/money/crediting.py): reads one source partition's gifts not yet
-- credited, on the source's shard. For each outbox (one per target partition) the entries
-- after the cursor given (exclusive), at most a batch each; trims what is both credited
-- (at or before the cursor: entries below it) and older than the retention (a failover of
-- the creator's shard rolls its cursor back and credits again from here); and when anything
-- was read, writes the marker, so a `WAIT n timeout` sent next on the same connection covers
-- every entry read (the replicas apply writes in order).
-- KEYS: the source's outboxes giftstream:{pSS}:credits:pCC for CC = 0..P-1, then the marker
-- giftstream:{pSS}:credit_take.
-- ARGV: per outbox its cursor ('' = nothing credited yet), then the batch size per outbox and
-- the retention in ms.
-- Reply: per outbox, in KEYS order, the entries read as XRANGE gives them.
local outboxes = #KEYS - 1
local marker = KEYS[#KEYS]
if outboxes < 1 or #ARGV ~= outboxes + 2 then
  error('giftstream: credit_take needs its outboxes, the marker, a cursor each, batch, retention')
end
local batch = int_arg(outboxes + 1, 1, 100000)
local retention = int_arg(outboxes + 2, 0, 2^40)

-- A stream id as (ms, seq) numbers, or an error: cursors come from this shard's XRANGE.
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if not ms then
    error('giftstream: not a stream id: ' .. id)
  end
  return tonumber(ms), tonumber(seq)
end

local oldest_kept = math.max(redis_now() - retention, 0)
local read, trims, any = {}, {}, false
for i = 1, outboxes do
  local cursor = ARGV[i]
  local start = '-'
  if cursor ~= '' then
    local ms, seq = id_parts(cursor)
    start = '(' .. cursor
    -- MINID removes the entries below it: below the cursor and below the retention's edge
    if ms < oldest_kept then
      trims[#trims + 1] = {KEYS[i], string.format('%d-%d', ms, seq)}
    else
      trims[#trims + 1] = {KEYS[i], string.format('%d-0', oldest_kept)}
    end
  end
  read[i] = redis.call('XRANGE', KEYS[i], start, '+', 'COUNT', batch)
  if #read[i] > 0 then
    any = true
  end
end

for _, trim in ipairs(trims) do
  redis.call('XTRIM', trim[1], 'MINID', trim[2])
end
if any then
  redis.call('INCR', marker)
end
return read
