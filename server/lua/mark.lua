-- A write that only marks a point in a master's replication stream: a WAIT sent after it on
-- the same connection then says whether the replicas hold everything written before it
-- (the relay's reads, same_connection.replicated).
-- KEYS: the mark (in the slot whose writes are waited for). Reply: the mark's count.
return redis.call('INCR', KEYS[1])
