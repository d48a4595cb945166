-- The creator of a live room is connected to this gateway now (Redis's clock): the idle
-- sweep (room_publish's 'idle') leaves the room live. A room not live is left alone.
-- KEYS: room record.
if redis.call('HGET', KEYS[1], 'live') ~= '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'creator_seen', redis_now())
return 1
