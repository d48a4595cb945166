-- Moves one ledger entry a consumer group gave up on to the dead-letter stream: XACK, and
-- only if it was still pending, XADD. So two consumers burying the same entry (one stalled
-- past the claim time) write one dead letter, and a crash never leaves one without the other.
-- KEYS: the ledger stream, the dead-letter stream.
-- ARGV: group, stream id, data (the original), reason, deliveries, consumer.
-- Reply: the dead letter's id, or false when the entry was no longer pending.
local ledger, dead = KEYS[1], KEYS[2]
local group, stream_id = ARGV[1], ARGV[2]
int_arg(5, 0, 2^52)
if redis.call('XACK', ledger, group, stream_id) == 0 then
  return false
end
return redis.call('XADD', dead, '*', 'data', ARGV[3], 'stream_id', stream_id, 'group', group,
  'reason', ARGV[4], 'deliveries', ARGV[5], 'consumer', ARGV[6])
