-- KEYS: entry   ARGV: token, answer, ttl_ms   -> 1 kept, 0 not this token's claim
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'answer', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
