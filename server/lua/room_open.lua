-- Opens a creator's room, from any gateway: live, in the live set, seen now (Redis's clock),
-- its viewer count to be announced afresh, and a new session: its session leaderboard empty,
-- its coins this session (`session_coins`, the ops feed's `coins`) 0 and no `leaders`
-- published yet. `opened` is when, by Redis's clock (`started` is the gateway's): credit.lua
-- counts a gift on the session board (and coins) only if settled since. A room already live
-- stays as it is (its session board and coins too: a live room restored after a restart keeps
-- them); a non-empty title replaces its title.
-- KEYS: room record, the live-room set of the room's partition (its slot on a cluster), the
-- room's session board.
-- ARGV: creator (the room's id), title, started (ms), the creator's display name as JSON text
-- ('' = the id), which the boards show for them.
-- Reply: {opened now (0/1), title, started}.
local room_record, live_set, session_board = KEYS[1], KEYS[2], KEYS[3]
local creator, title = ARGV[1], ARGV[2]
local started = int_arg(3, 0, 2^50)
local creator_name = name_json(ARGV[4], creator)
if redis.call('HGET', room_record, 'live') == '1' then
  if title ~= '' then
    redis.call('HSET', room_record, 'title', title)
  end
  local record = redis.call('HMGET', room_record, 'title', 'started')
  return {0, record[1] or '', exact_int(record[2] or '') or 0}
end
local now = redis_now()
redis.call('HSET', room_record, 'creator', creator, 'title', title, 'live', '1',
  'started', started, 'opened', now, 'creator_seen', now, 'viewers_announced', 0,
  'creator_name', creator_name, 'leaders', '[]', 'leaders_at', 0, 'session_coins', 0)
redis.call('SADD', live_set, creator)
redis.call('DEL', session_board)
return {1, title, started}
