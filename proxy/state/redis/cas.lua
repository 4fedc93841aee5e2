-- KEYS: claim, pending   ARGV: expected, value, ttl, task_id, at ('' = counted: not pending)
-- A claim's compare-and-set: pending -> done, or pending -> pending by a new owner.
local have = redis.call('GET', KEYS[1])
if have == ARGV[2] then return 1 end -- done already: this call retried after a lost reply
if have ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[2], ARGV[4])
else
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
end
return 1
