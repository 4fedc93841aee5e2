-- KEYS: task, reconcile   ARGV: status, final (1: no more background polls), task_id
if ARGV[2] == '1' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
