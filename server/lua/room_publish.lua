-- Writes one room's events of a tick, from any gateway (server/realtime/redis_broker.py):
-- each op in turn, numbered by room_seq and appended to the room's log.
--   'e' kind head tail   an event encoded by the gateway with its seq cut out: head..seq..tail
--   'v'                  `viewers`, when the room's count has changed since last announced:
--                        the sum of the gateways' presence fields not yet expired (the expired
--                        are deleted), so N gateways asking once a second make one event
--   'end'                `room_ended`, and the room is no longer live (live=0, out of the live
--                        set): one atomic end, whichever gateway asks
--   'idle' ms            the same end, only when the creator has not been seen for `ms`
--   'l' gap_ms           `leaders`, the session board's top 3 (with names), when it differs
--                        from the last published (the record's `leaders`) and `gap_ms` have
--                        passed since (`leaders_at`): so N gateways asking after each gift
--                        they saw make one event per change, at most one per gap
-- A room that has ended (live=0) takes no more events: its `room_ended` was the last.
-- KEYS: room record, room log, room presence, the live-room set of the room's partition, the
-- room's session board and names.
-- ARGV: log size, room id, room id as JSON, the highest seq the calling gateway has delivered
-- in the room, then the ops.
-- The delivered seq lifts `seq_reserved` to at least it before any op is numbered (a lift
-- only, never lower): after a failover of the room's shard lost the last events, the first
-- call of any gateway that delivered them puts the room's numbering back above them, so no
-- seq a viewer has seen is given again (docs/reliability.md, "On a Redis Cluster").
-- Reply: {viewers now (-1 when no 'v'), ended by this call (0/1), live after (0/1), last seq,
-- leaders (-1 no 'l', 0 unchanged, 1 published, 2 changed but within the gap: ask again),
-- the room's seq as found, before the lift (below the delivered seq: the room stepped back)}.
local room_record, room_log, presence, live_set = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local session_board, names = KEYS[5], KEYS[6]
local log_size = int_arg(1, 1, 2^31)
local room_id, room_json = ARGV[2], ARGV[3]
local delivered = int_arg(4, 0, 2^53 - 1)
local state = redis.call('HGET', room_record, 'live')
local live, open = state == '1', state ~= '0'
local seq = room_seq(room_record, room_log)
local found = seq
local now = redis_now()
local viewers, ended, leaders = -1, 0, -1
-- the leaders' reads, checked here before any write
want_type(session_board, 'zset')
want_type(names, 'hash')
local leaders_at = stored_int(room_record, 'leaders_at')

-- every check above; the first write: the lift
if delivered > seq then
  redis.call('HSET', room_record, 'seq_reserved', delivered)
  seq = delivered
end

local function append(kind, data)
  seq = seq + 1
  append_room_event(room_record, room_log, seq, kind, data, log_size)
end

local function end_room()
  seq = seq + 1
  append_room_event(room_record, room_log, seq, 'room_ended',
    '{"type":"room_ended","room":' .. room_json .. string.format(',"seq":%d}', seq), log_size)
  redis.call('HSET', room_record, 'live', '0')
  redis.call('SREM', live_set, room_id)
  live, open, ended = false, false, 1
end

-- The presence fields are `<users>:<expires ms>`; an expired or unreadable one is a gone
-- gateway's, deleted here.
local function presence_sum()
  local flat = redis.call('HGETALL', presence)
  local sum, gone = 0, {}
  for i = 1, #flat, 2 do
    local users, expires = string.match(flat[i + 1], '^(%d+):(%d+)$')
    users, expires = exact_int(users or ''), exact_int(expires or '')
    if users and expires and expires > now then
      sum = sum + users
    else
      gone[#gone + 1] = flat[i]
    end
  end
  if #gone > 0 then
    redis.call('HDEL', presence, unpack(gone))
  end
  return sum
end

local i = 5
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'e' then
    if open then
      append(ARGV[i + 1], ARGV[i + 2] .. string.format('%d', seq + 1) .. ARGV[i + 3])
    end
    i = i + 4
  elseif op == 'v' then
    viewers = presence_sum()
    if open and viewers ~= stored_int(room_record, 'viewers_announced') then
      append('viewers', '{"type":"viewers","room":' .. room_json ..
        string.format(',"seq":%d,"count":%d}', seq + 1, viewers))
      redis.call('HSET', room_record, 'viewers_announced', viewers)
    end
    i = i + 1
  elseif op == 'l' then
    local gap = int_arg(i + 1, 0, 2^40)
    if open then
      local parts = {}
      for _, e in ipairs(board_top(session_board, names, 3)) do
        -- user ids need no JSON escaping; names are kept as JSON text
        parts[#parts + 1] = '{"user":"' .. e[1] .. '","name":' .. (e[3] or ('"' .. e[1] .. '"'))
          .. string.format(',"coins":%d}', e[2])
      end
      local top = '[' .. table.concat(parts, ',') .. ']'
      if top == (redis.call('HGET', room_record, 'leaders') or '[]') then
        leaders = 0
      elseif now - leaders_at < gap then
        leaders = 2
      else
        append('leaders', '{"type":"leaders","room":' .. room_json ..
          string.format(',"seq":%d,"top":', seq + 1) .. top .. '}')
        redis.call('HSET', room_record, 'leaders', top, 'leaders_at', now)
        leaders_at, leaders = now, 1
      end
    end
    i = i + 2
  elseif op == 'end' then
    if live then end_room() end
    i = i + 1
  elseif op == 'idle' then
    local idle_ms = int_arg(i + 1, 0, 2^50)
    local seen = math.max(stored_int(room_record, 'creator_seen'),
      stored_int(room_record, 'started'))
    if live and now - seen >= idle_ms then end_room() end
    i = i + 2
  else
    error('giftstream: unknown room op ' .. tostring(op))
  end
end
return {viewers, ended, live and 1 or 0, seq, leaders, found}
