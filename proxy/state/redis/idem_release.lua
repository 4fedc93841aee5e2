-- KEYS: entry   ARGV: token   -> 1 released, 0 not this token's running claim
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'answer') == 1 then return 0 end
redis.call('DEL', KEYS[1])
return 1
