-- KEYS: conc, resv, resvn, resvs (see admit.lua)   ARGV: tokens...
local freed = 0
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
  local n = redis.call('HGET', KEYS[4], ARGV[i])
  if n then
    redis.call('HDEL', KEYS[4], ARGV[i])
    freed = freed + tonumber(n)
  end
end
if freed > 0 then redis.call('HINCRBY', KEYS[4], '#', -freed) end
return 1
