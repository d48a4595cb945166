-- Moves one ledger entry a consumer group gave up on to the dead-letter stream: XADD, and
-- XACK, only if it is still pending. So two consumers burying the same entry (one stalled
-- past the claim time) write one dead letter, and a crash never leaves one without the other.
-- Checks first, then the XADD (the one write that can fail: the key of another type, ...),
-- then the XACK, which cannot fail once XPENDING has read the same stream, group and id.
-- KEYS: the ledger stream, the dead-letter stream.
-- ARGV: group, stream id, data (the original), reason, deliveries, consumer.
-- Reply: the dead letter's id, or false when the entry was no longer pending.
local ledger, dead = KEYS[1], KEYS[2]
local group, stream_id = ARGV[1], ARGV[2]
int_arg(5, 0, 2^52)
if #ARGV ~= 6 then
  error('giftstream: dead_letter takes 6 arguments, not ' .. #ARGV)
end
local pending = redis.pcall('XPENDING', ledger, group, stream_id, stream_id, 1)
if pending.err then
  if string.find(pending.err, '^NOGROUP') then  -- no ledger or no group: nothing pending
    return false
  end
  error(pending)
end
if #pending == 0 then
  return false
end
local id = redis.call('XADD', dead, '*', 'data', ARGV[3], 'stream_id', stream_id,
  'group', group, 'reason', ARGV[4], 'deliveries', ARGV[5], 'consumer', ARGV[6])
redis.call('XACK', ledger, group, stream_id)
return id
