-- KEYS: task, index, reconcile   ARGV: task_id, created_at, ttl, next_check ('' = none),
-- field, value, ...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
local created = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], created, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', created - tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1]) end
return 1
