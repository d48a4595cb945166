-- One gateway's viewers of one room, summed by room_publish's 'v': field = gateway id, value
-- `<users>:<expires ms>` (Redis's clock), so a gateway that dies leaves the count once its
-- fields expire. 0 users deletes the field. The hash itself expires with its longest-lived field.
-- KEYS: room presence. ARGV: gateway id, users, time to live (ms).
local presence, gateway = KEYS[1], ARGV[1]
local users = int_arg(2, 0, 2^40)
local ttl = int_arg(3, 1, 2^40)
if users == 0 then
  return redis.call('HDEL', presence, gateway)
end
redis.call('HSET', presence, gateway, string.format('%d:%d', users, redis_now() + ttl))
if redis.call('PTTL', presence) < ttl then  -- never cut a longer-lived field's life short
  redis.call('PEXPIRE', presence, ttl)
end
return 1
