-- KEYS: used_d, used_m, resv, resvn, resvs (see admit.lua)
-- ARGV: images, day_ttl, month_ttl, tokens...
local d = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local m = redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local freed = 0
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
  local n = redis.call('HGET', KEYS[5], ARGV[i])
  if n then
    redis.call('HDEL', KEYS[5], ARGV[i])
    freed = freed + tonumber(n)
  end
end
if freed > 0 then redis.call('HINCRBY', KEYS[5], '#', -freed) end
return {d, m}
