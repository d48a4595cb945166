-- Opens a creator's room, from any gateway: live, in the live set, seen now (Redis's clock),
-- its viewer count to be announced afresh. A room already live stays as it is; a non-empty
-- title replaces its title.
-- KEYS: room record, the live-room set of the room's partition (its slot on a cluster).
-- ARGV: creator (the room's id), title, started (ms).
-- Reply: {opened now (0/1), title, started}.
local room_record, live_set = KEYS[1], KEYS[2]
local creator, title = ARGV[1], ARGV[2]
local started = int_arg(3, 0, 2^50)
if redis.call('HGET', room_record, 'live') == '1' then
  if title ~= '' then
    redis.call('HSET', room_record, 'title', title)
  end
  local record = redis.call('HMGET', room_record, 'title', 'started')
  return {0, record[1] or '', exact_int(record[2] or '') or 0}
end
redis.call('HSET', room_record, 'creator', creator, 'title', title, 'live', '1',
  'started', started, 'creator_seen', redis_now(), 'viewers_announced', 0)
redis.call('SADD', live_set, creator)
return {1, title, started}
